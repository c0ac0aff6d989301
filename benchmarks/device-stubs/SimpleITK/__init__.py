"""A stand-in for SimpleITK on the device machine (benchmarks/device-wheels.txt): importable, refuses any use."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError("SimpleITK is not carried to the device machine (benchmarks/device-wheels.txt); "
                      "this run must not read images through it")
