import pytest

from ditcache import FORAConfig, ToCaConfig, ToMeConfig
from ditcache.eval import speed


def test_method_specs():
    assert speed.parse_method("uncached").config is None
    assert speed.parse_method("fora:4").config == FORAConfig(cache_interval=4)
    assert speed.parse_method("toca:3:0.8:k_norm").config == ToCaConfig(
        cache_interval=3, cache_ratio=0.8, score="k_norm", schedule="constant"
    )
    assert speed.parse_method("taylorseer:4").peer.value == "4"
    with pytest.raises(ValueError, match="fbc"):
        speed.parse_method("teacache")
    with pytest.raises(ValueError, match="toca:N:R"):
        speed.parse_method("toca:3")
    with pytest.raises(ValueError, match="cache_ratio"):
        speed.parse_method("toca:3:1.5")
    assert speed.parse_method("tome:0.5:mlp").config == ToMeConfig(ratio=0.5, merge_mlp=True, seed=0)
    assert speed.parse_method("fora:3+tome:0.4").config == [FORAConfig(cache_interval=3), ToMeConfig(ratio=0.4, seed=0)]
    with pytest.raises(ValueError, match="join one of fora/toca with one tome"):
        speed.parse_method("fora:3+fbc")


@pytest.mark.parametrize("model", ["dit", "pixart"])
def test_benchmark_prints_a_table_and_writes_json(tmp_path, capsys, model):
    out = tmp_path / "rows.json"
    rows = speed.main(
        ["--model", model, "--size", "8", "--steps", "4", "--repeats", "1", "--warmup", "0", "--quiet", "--out", str(out),
         "--methods", "fora:2", "toca:2:0.5:random", "tome:0.5+toca:2:0.5:random"]
    )
    assert [row.method for row in rows] == ["uncached", "fora:2", "toca:2:0.5:random", "tome:0.5+toca:2:0.5:random"]
    assert rows[3].flops_counted < rows[2].flops_counted and rows[3].flops_engine == pytest.approx(rows[3].flops_counted, rel=0.01)
    assert rows[1].flops_counted < rows[0].flops_counted and rows[1].flops_engine == pytest.approx(rows[1].flops_counted, rel=0.01)
    assert "toca:2:0.5:random" in capsys.readouterr().out and out.exists()


def test_benchmark_builds_any_family_with_a_tiny_builder(capsys):
    """A family that only its spec describes (Wan): built from its spec's tiny builder, called from the
    pipeline's signature, with diffusers' caches on the branches its spec names."""
    rows = speed.main(["--model", "wan", "--size", "8", "--frames", "5", "--steps", "7", "--repeats", "1", "--warmup", "0",
                       "--quiet", "--methods", "fora:3", "toca:3:0.5:attention", "taylorseer:3"])
    uncached, fora, toca, taylorseer = rows
    assert fora.flops_counted < toca.flops_counted < uncached.flops_counted
    for row in (fora, toca):
        assert row.flops_engine == pytest.approx(row.flops_counted, rel=0.01)
    assert taylorseer.flops_counted < uncached.flops_counted  # its default patterns match no Wan module: the spec's branches
    assert "wan width=tiny" in capsys.readouterr().out
