"""Int8 calibration: histograms of activations, range methods and quantization schemes."""
