import pytest

from diffq.errors import DiffQError
from diffq.metrics.evaluate import parse_presets, preset_spec


def test_preset_options_parse_and_validate():
    assert preset_spec("w4a4:rank=0") == ("w4a4", {"rank": 0})
    assert preset_spec("mixed:budget=3.5;activations=dynamic") == ("mixed", {"budget": 3.5, "activations": "dynamic"})
    assert parse_presets("fp,w4a4,w4a4:rank=0") == ["fp", "w4a4", "w4a4:rank=0"]
    assert preset_spec("w4.0a8:check=false") == ("w4.0a8", {"check": False})
    assert preset_spec("w4.0a8:check=TRUE") == ("w4.0a8", {"check": True})
    assert preset_spec("w4a8:temporal_bits=4") == ("w4a8", {"temporal_bits": 4})
    assert preset_spec("w4.0a8:sensitivity_metric=image;check=false") == (
        "w4.0a8", {"sensitivity_metric": "image", "check": False})
    with pytest.raises(DiffQError, match="bad preset option"):
        parse_presets("w4a4:depth=3")
    with pytest.raises(DiffQError, match="not true or false"):
        preset_spec("w4.0a8:check=maybe")
    with pytest.raises(DiffQError, match="unknown preset 'w9a9'"):
        parse_presets("w9a9:rank=1")
