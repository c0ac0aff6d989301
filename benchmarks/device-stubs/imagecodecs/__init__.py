"""A stand-in for imagecodecs on the device machine (benchmarks/device-wheels.txt): importable, refuses any use."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError("imagecodecs is not carried to the device machine (benchmarks/device-wheels.txt); "
                      "this run must not read images through it")
