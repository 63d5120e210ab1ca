"""The server's ``--conf`` options: parsed once at start, a bad value named in a clear error."""

from __future__ import annotations

import pytest

from lib.conf_values import conf_flag, conf_float, conf_int
from lib.core.config import ProfileError
from lib.datastore import max_upload_mb


def test_the_servers_conf_options_are_checked_once_with_a_clear_message():
    assert conf_int({"encode_batch": " 8 "}, "encode_batch", 0, 0, 256, ProfileError) == 8
    assert conf_int({"encode_batch": ""}, "encode_batch", 0, 0, 256, ProfileError) == 0  # empty: the default
    with pytest.raises(ProfileError, match="--conf encode_batch: expected a whole number, got 'eight'"):
        conf_int({"encode_batch": "eight"}, "encode_batch", 0, 0, 256, ProfileError)
    with pytest.raises(ProfileError, match="must be between 0 and 256, got 300"):
        conf_int({"encode_batch": "300"}, "encode_batch", 0, 0, 256, ProfileError)
    assert conf_flag({"warm_up": "Off"}, "warm_up", True) is False and conf_flag({}, "warm_up", True) is True
    with pytest.raises(ProfileError, match="--conf warm_up: expected true or false, got 'maybe'"):
        conf_flag({"warm_up": "maybe"}, "warm_up", True, ProfileError)
    assert conf_float({"embedding_cache_mb": "0"}, "embedding_cache_mb", 512, 0) == 0.0
    for bad in ("lots", "-1", "nan", "inf"):
        with pytest.raises(ProfileError, match="--conf embedding_cache_mb"):
            conf_float({"embedding_cache_mb": bad}, "embedding_cache_mb", 512, 0, ProfileError)


def test_the_upload_limit_is_a_finite_number_of_mib_above_zero():
    assert max_upload_mb(None) == 2048.0 and max_upload_mb({"max_upload_mb": "0.5"}) == 0.5
    for bad in ("0", "-3", "inf", "nan", "big"):  # inf once crashed the request guard with an OverflowError
        with pytest.raises(ValueError, match="--conf max_upload_mb"):
            max_upload_mb({"max_upload_mb": bad})
    with pytest.raises(ValueError, match="must be a finite number above 0, got 0"):
        max_upload_mb({"max_upload_mb": "0"})


def test_a_bad_option_fails_the_start_before_monai_labels_app_is_built(tmp_path):
    """Every ``--conf`` option is parsed before ``MONAILabelApp.__init__`` (which builds the datastore and
    the tasks): a typo fails the start at once, naming the option."""
    import main

    for option, bad in (("warm_up", "maybe"), ("training_nice", "20"), ("embedding_cache_mb", "lots")):
        with pytest.raises(ProfileError, match=f"--conf {option}"):
            main.MedSamAdapterApp(str(main.Path(main.__file__).parent), str(tmp_path), {option: bad})
        assert not any(tmp_path.iterdir())  # no datastore was made in the studies folder
