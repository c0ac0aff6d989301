__version__ = "0.1.0"


def _check_torch() -> None:
    """The installed PyTorch against the declared and the tested versions (medadapt.utils.torch_version): a
    warning at import where it is outside them; the CLI refuses one outside the declared range."""
    import warnings

    from medadapt.utils.torch_version import check

    problem = check()
    if problem is not None:
        warnings.warn(problem[1], RuntimeWarning, stacklevel=3)


_check_torch()
