"""python -m piece_mm.experiments.where: a task's delta split by layer and by kind, rebuilt from a finished run."""
import pytest

from piece_mm.delta import load_delta
from piece_mm.experiments.where import groups, main, stages, where


def test_groups_put_every_weight_in_one_layer_and_one_kind():
    names = ["model.language_model.layers.0.self_attn.k_proj.weight",
             "model.language_model.layers.3.mlp.up_proj.weight",
             "lm_head.weight", "model.language_model.layers.0.input_layernorm.weight"]
    g = groups(names)
    layers = [n for k, v in g.items() if k.startswith("layer") or k == "outside the layers" for n in v]
    kinds = [n for k, v in g.items() if not (k.startswith("layer") or k == "outside the layers") for n in v]
    assert sorted(layers) == sorted(names) == sorted(kinds)
    assert g["layer 0"] == [names[0], names[3]] and g["k_proj"] == [names[0]] and g["norm"] == [names[3]]
    assert g["outside the layers"] == ["lm_head.weight"] == g["lm_head"]


def test_where_rebuilds_the_run_and_splits_the_delta(uninterrupted_run):
    _, run = uninterrupted_run
    rec = where(run, 2, limit=4)
    delta = load_delta(sorted((run / "deltas").glob("2-*.safetensors"))[0])
    total = sum(idx.numel() for idx, _ in delta.values())
    layer_rows = [r for g, r in rec["groups"].items() if g.startswith("layer") or g == "outside the layers"]
    kind_rows = [r for g, r in rec["groups"].items() if not (g.startswith("layer") or g == "outside the layers")]
    assert sum(r["weights"] for r in layer_rows) == total == sum(r["weights"] for r in kind_rows)
    assert rec["captions"] == 4 and 0 <= rec["before"]["wrong"] <= 4 and 0 <= rec["after"]["wrong"] <= 4
    for r in rec["groups"].values():  # a group's delta alone, and all but it, are two rebuilt models
        assert 0 <= r["only"]["wrong"] <= 4 and 0 <= r["without"]["wrong"] <= 4


def test_stages_apply_the_deltas_in_order_as_where_rebuilds_each_task(uninterrupted_run):
    _, run = uninterrupted_run
    rec = stages(run, limit=4)
    assert [r["task"] for r in rec["stages"]] == [f.stem for f in sorted((run / "deltas").glob("*.safetensors"))]
    for k, r in enumerate(rec["stages"], 1):  # after task k = where's model with task k's whole delta applied
        after = where(run, k, limit=4)
        assert {"wrong": r["wrong"], "gained": r["gained"]} == after["after"]
        if k == 1:
            assert rec["before"] == {"task": "before", **after["before"]}


def test_a_delta_names_its_task_method_budget_and_base(uninterrupted_run):
    import hashlib
    import json

    from safetensors import safe_open

    from piece_mm.models import load_model
    _, run = uninterrupted_run
    path = sorted((run / "deltas").glob("2-*.safetensors"))[0]
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["piece_mm"])
    config = load_model("llava")[0].config.to_json_string(use_diff=False)  # the base, loaded afresh here
    assert meta == {"task": path.stem.split("-", 1)[1], "method": "piece-f", "model": "llava",
                    "model_config_sha256": hashlib.sha256(config.encode()).hexdigest(),
                    "budget": "configs/budgets/default.yaml"}


@pytest.mark.parametrize("argv, says", [(["--task", "1"], "no run_args.json"), (["--task", "9"], "--task 9"),
                                        (["--stages"], "no run_args.json")])
def test_where_errors_are_one_line(uninterrupted_run, tmp_path, capsys, argv, says):
    _, run = uninterrupted_run
    target = tmp_path if "run_args" in says else run
    assert main(["--run", str(target), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
