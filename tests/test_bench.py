"""The load generator behind `picochat bench`: exact output lengths (EOS ignored), vLLM's key
names and definitions, concurrency and Poisson arrivals, goodput and length ranges."""

from __future__ import annotations

import json

import pytest

from picochat.bench.loadgen import BenchConfig, parse_len, percentile, run_bench, run_load, summarize
from picochat.config import EngineConfig, SchedulerConfig
from picochat.engine.engine import LocalEngine
from picochat.errors import ConfigError

VLLM_KEYS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
             "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms")


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    engine = LocalEngine(EngineConfig(model="tiny", scheduler=SchedulerConfig(max_num_seqs=4)), loaded=tiny_loaded)
    yield engine
    engine.close()


def test_each_request_produces_exactly_its_output_length(engine):
    cfg = BenchConfig(concurrency=3, num_prompts=6, input_len=(5, 40), output_len=(3, 12), seed=1)
    results, duration = run_load(engine, cfg)
    assert len(results) == 6 and all(r.error is None for r in results)
    workload_out = sorted(r.output_len for r in results)
    from picochat.bench.loadgen import make_workload
    assert workload_out == sorted(n for _, n in make_workload(cfg))
    assert all(len(r.itl) == r.output_len - 1 for r in results)
    s = summarize(results, duration, cfg)
    assert s["total_output_tokens"] == sum(workload_out)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])


def test_json_line_uses_vllm_keys(engine, capsys):
    cfg = BenchConfig(concurrency=2, num_prompts=4, request_rate=50.0, input_len=(8, 8), output_len=(4, 4),
                      warmup=0, goodput=("ttft:60000", "tpot:60000"))
    summary = run_bench(engine, cfg, as_json=True)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in VLLM_KEYS:
        assert key in last
    assert last["completed"] == 4 and last["total_output_tokens"] == 16
    assert last["request_goodput"] == pytest.approx(4 / summary["duration"])
    assert last["achieved_weight_gbs"] > 0 and 0 < last["bandwidth_share"]


def test_measures_only_once_the_fast_decode_step_is_built(engine, capsys):
    """A local engine serves eagerly while its fast step builds: the bench waits for it after the
    warm-up, and says which step it measured."""
    class Building:
        def __init__(self) -> None:
            self.polls, self.submitted_while_building = 0, 0

        @property
        def decode_step(self) -> str:
            self.polls += 1
            return "compiling" if self.polls < 4 else "compiled"

        def submit(self, *args, **kwargs):
            self.submitted_while_building += self.polls < 4
            return engine.submit(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(engine, name)

    building = Building()
    cfg = BenchConfig(concurrency=2, num_prompts=2, input_len=(8, 8), output_len=(4, 4), warmup=1)
    summary = run_bench(building, cfg, as_json=True)
    assert building.polls >= 4 and building.submitted_while_building == 1  # the warm-up alone
    assert summary["decode_step"] == "compiled" and summary["completed"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decode_step"] == "compiled"


def test_lengths_and_percentiles():
    assert parse_len("128") == (128, 128) and parse_len("32:256") == (32, 256)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(ConfigError):
            parse_len(bad)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert percentile(list(range(101)), 90) == 90
