"""A GStreamer RTSP server on loopback, run by the system Python (``python3-gi``) for ``tests.rtsp``.

    /usr/bin/python3 tests/rtsp_server.py PORT FPS [USER PASSWORD]

Mounts: ``/live`` (a moving ball, 320x240 at FPS frames/s: every frame differs) and ``/frozen`` (a
solid frame at FPS: every frame is the same, as an NVR sends for a camera that lost its signal); with
USER and PASSWORD both need them (basic authentication).
Frames are MJPEG over RTP (``rtpjpegpay``), which FFmpeg decodes without any codec outside
gstreamer1.0-plugins-base/-good. Prints "ready" once it listens. Not a test module.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

CAPS = "video/x-raw,width=320,height=240,framerate={fps}/1"
LAUNCH = ("( videotestsrc is-live=true pattern={pattern} ! " + CAPS + " ! videoconvert ! "
          "video/x-raw,format=I420 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )")


def main() -> None:
    port, fps = sys.argv[1], int(sys.argv[2])
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    mounts = server.get_mount_points()
    secured = len(sys.argv) >= 5
    for path, pattern in (("/live", "ball"), ("/frozen", "solid-color")):
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(LAUNCH.format(pattern=pattern, fps=fps))
        factory.set_shared(True)
        if secured:
            factory.add_role_from_structure(Gst.Structure.from_string(
                "operator, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
        mounts.add_factory(path, factory)
    if secured:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "operator")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(sys.argv[3], sys.argv[4]), token)
        server.set_auth(auth)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
