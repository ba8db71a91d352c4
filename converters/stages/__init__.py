"""``convert()``'s stages, in the order it runs them; each a function with explicit inputs and outputs.

1. :mod:`~converters.stages.load`: the graph loaded and checked, the user's pre/post-processing as a
   manifest (:func:`load.prepare`), then the canonical graph every pass works on (:func:`load.canonical`);
2. :mod:`~converters.stages.prune`: ``prune=`` (optional);
3. :mod:`~converters.stages.fp32`: the anomaly threshold (anomaly-score), golden vectors and
   validation accuracy of the fp32 graph through the runtime's own pipeline;
4. :mod:`~converters.stages.int8`: ``quantize="int8"`` (optional): calibration and one graph per target;
5. :mod:`~converters.stages.assemble`: the manifest, reports and files of the package.

The user's arguments are parsed once, before any stage, by :mod:`converters.arguments`.
"""
