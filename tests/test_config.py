"""Typed configs: strict loading, overrides, range checks."""

import pytest

from cctl_rec.config import TrainConfig, dump_yaml, load_config


def test_defaults_are_the_papers_choices_but_the_selector_is_the_products():
    cfg = load_config(None)
    # issue 16: the product default is the evidence selector; the paper's is selector.mode=paper
    assert cfg.selector.mode == "evidence" and cfg.selector.init_p == 0.5
    assert cfg.selector.gamma == 0.8 and cfg.selector.update_every == 1000 and cfg.selector.alpha == 1.0
    assert cfg.scn.sync_every == 1000 and cfg.model.embedding_dim == 8 and cfg.model.tower == (256, 128, 32)
    assert cfg.data.epochs == 1 and cfg.scn.reward_source == "train_batch"


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("configs/cctl_tiny.yaml", ["selector.alpha=0.5", "model.tower=[64, 8]", "ren.enabled=false"])
    assert cfg.selector.alpha == 0.5 and cfg.model.tower == (64, 8) and cfg.ren.enabled is False
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float key takes it as the number it is
    assert load_config(None, ["selector.lr=3e-4", "optim.dense_lr=1E-3"]).selector.lr == 3e-4
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(str(p)) == cfg


@pytest.mark.parametrize("override,msg", [
    ("selector.gama=0.5", "unknown config key 'selector.gama'; valid: alpha, causal_credit"),
    ("selector.gamma=1.5", "selector.gamma must be in [0, 1], got 1.5"),
    ("scn.sync_every=0", "scn.sync_every must be > 0, got 0"),
    ("selector.alpha=-1", "selector.alpha must be >= 0, got -1"),
    ("data.batch_size=0", "data.batch_size must be > 0, got 0"),
    ("model.tower=[]", "model.tower must list at least one hidden width"),
    ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
    ("selector.lr=3e", "selector.lr must be a number, got '3e'"),
    ("selector.mode=magic", "selector.mode must be one of"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("novalue", "must look like section.key=value"),
])
def test_bad_config_values_name_the_key(override, msg):
    with pytest.raises((ValueError, TypeError)) as e:
        load_config(None, [override])
    assert msg in str(e.value)


@pytest.mark.reliability("config", "wrong type", expect="loader level: a YAML file that does not parse, is "
                         "missing, or holds a list: ValueError / FileNotFoundError naming the file")
def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping at top level"):
        load_config(str(tmp_path / "list.yaml"))


def test_every_shipped_config_loads():
    import glob

    for path in glob.glob("configs/*.yaml"):
        assert isinstance(load_config(path), TrainConfig), path
