"""regionclip: region–text pretraining in the style of RegionCLIP. The Python API is
:class:`regionclip.api.RegionCLIP` (``from regionclip import RegionCLIP``)."""


def __getattr__(name: str):
    # lazy, so that importing a light submodule (regionclip.config) does not load torch and open_clip
    if name == "RegionCLIP":
        from regionclip.api import RegionCLIP

        return RegionCLIP
    raise AttributeError(f"module 'regionclip' has no attribute {name!r}")
