"""``make profile``'s sampler and driver: the sampler counts CPU time where it is spent and
none while blocked, its summary adds up exactly, and the driver profiles the real service and
the bare route under the ingest load (a short run: its shares mean nothing here)."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from log_audit import audit_output

from bench import profile, sampler
from bench.processes import WEBHOOK_TOKEN
from bench.sampler import Sampler, Stack
from bench.servers import STANDIN_API_KEY

# The profiled service's secrets, named here so that the log audit looks for them in its logs.
PROFILE_WEBHOOK_TOKEN = WEBHOOK_TOKEN
PROFILE_API_KEY = STANDIN_API_KEY


def _burn(cpu_s: float) -> int:
    started = time.process_time()
    turns = 0
    while time.process_time() - started < cpu_s:
        turns += 1
    return turns


def _idle(wall_s: float) -> None:
    time.sleep(wall_s)


def _functions(samples: collections.Counter[Stack]) -> collections.Counter[str]:
    counted: collections.Counter[str] = collections.Counter()
    for stack, count in samples.items():
        for name in {function for _, function, _ in stack}:
            counted[name] += count
    return counted


def test_the_sampler_counts_cpu_time_where_it_is_spent_and_none_while_blocked() -> None:
    profiler = Sampler()
    profiler.start()
    try:
        _burn(0.4)
        _idle(0.4)
    finally:
        profiler.stop()
    total = sum(profiler.samples.values())
    functions = _functions(profiler.samples)
    # 0.4 s of CPU at the kernel's tick (4 ms here, 1 ms asked) is 100 samples or more.
    assert total >= 50, profiler.samples
    assert functions["_burn"] >= 0.9 * total, functions
    assert functions["_idle"] <= 2, functions  # the tick at most, as the sleep began
    after = total
    _burn(0.1)  # stopped: no more samples
    assert sum(profiler.samples.values()) == after


def test_samples_survive_the_file_between_processes(tmp_path: Path) -> None:
    samples: collections.Counter[Stack] = collections.Counter(
        {
            (("/r/app.py", "leaf", 10), ("/r/main.py", "main", 1)): 3,
            (("/r/db.py", "Store.write", 7), ("/r/main.py", "main", 1)): 1,
        }
    )
    path = tmp_path / "samples.json"
    sampler.dump(samples, path)
    assert sampler.load(path) == samples
    assert not (tmp_path / "samples.json.partial").exists()


def test_the_share_of_a_function_counts_each_sample_holding_it_once() -> None:
    samples: collections.Counter[Stack] = collections.Counter(
        {
            (("/r/a.py", "f", 1), ("/r/a.py", "f", 9), ("/r/m.py", "main", 1)): 3,  # f twice
            (("/r/b.py", "g", 2), ("/r/m.py", "main", 1)): 1,
        }
    )
    roots = [("/r/", "")]
    assert sampler.share(samples, "a.py:f", roots) == 0.75
    assert sampler.share(samples, "m.py:main", roots) == 1.0
    assert sampler.share(samples, "b.py:f", roots) == 0.0
    assert sampler.share(collections.Counter(), "a.py:f", roots) == 0.0


def test_the_summary_gives_exact_shares_by_file_function_and_line() -> None:
    main = ("/r/main.py", "main", 1)
    samples: collections.Counter[Stack] = collections.Counter(
        {
            (("/r/app.py", "leaf", 10), ("/r/app.py", "mid", 5), main): 2,
            (("/r/app.py", "leaf", 11), ("/r/app.py", "mid", 5), main): 1,
            (("/r/db.py", "Store.write", 7), ("/r/app.py", "other", 6), main): 1,
            (("/lib/json.py", "dumps", 3), ("/r/app.py", "other", 6), main): 4,
        }
    )
    roots = [("/r/", ""), ("/lib/", "std:")]
    assert sampler.summary(samples, top=10, roots=roots) == {
        "samples": 8,
        "by_file": [["std:json.py", 50.0], ["app.py", 37.5], ["db.py", 12.5]],
        # main is on every stack: it tells nothing, and is left out.
        "inclusive": [
            ["app.py:other", 62.5],
            ["std:json.py:dumps", 50.0],
            ["app.py:leaf", 37.5],
            ["app.py:mid", 37.5],
            ["db.py:Store.write", 12.5],
        ],
        "self": [
            ["std:json.py:3 dumps", 50.0],
            ["app.py:10 leaf", 25.0],
            ["app.py:11 leaf", 12.5],
            ["db.py:7 Store.write", 12.5],
        ],
    }
    # Under one function: its samples only, as shares of those; the top N only.
    assert sampler.summary(samples, top=1, roots=roots, under="app.py:other") == {
        "samples": 5,
        "by_file": [["std:json.py", 80.0]],
        "inclusive": [["std:json.py:dumps", 80.0]],
        "self": [["std:json.py:3 dumps", 80.0]],
    }


def test_the_profile_samples_the_service_and_the_bare_route_under_the_ingest_load(
    tmp_path: Path,
) -> None:
    results = profile.profile_ingest(
        seconds=1.5, warm_up_s=0.3, top=60, out_dir=tmp_path, bare_spin=3000
    )
    for log in sorted((tmp_path / "logs").glob("*.log")):
        audit_output(f"profile {log.stem}", log.read_text(errors="replace"))
    for name in ("service", "bare"):
        figures = results[name]
        assert figures["requests"] > 0
        assert figures["statuses"] == {"200": figures["requests"]}, figures  # all stored
        assert figures["server_cpu_us_per_request"] > 0
        assert figures["all"]["samples"] > 0
        assert 0 < figures["send_us_per_request"] < figures["server_cpu_us_per_request"]
    service = {name for name, _ in results["service"]["all"]["inclusive"]}
    assert "gateway/app.py:BrevoWebhook._answer" in service
    route = results["service"]["route"]
    assert 0 < route["samples"] < results["service"]["all"]["samples"]
    assert "service/core/handoffs.py:HandoffManager.handle_webhook" in {
        name for name, _ in route["inclusive"]
    }
    assert results["service"]["flush"]["samples"] > 0
    bare = {name for name, _ in results["bare"]["all"]["inclusive"]}
    assert "bench/servers.py:bare_app.<locals>.ok" in bare
    assert "bench/servers.py:_spin" in bare  # --bare-spin reached the bare route
    assert results["bare_spin"] == 3000
    assert not any(name.startswith(("gateway/", "service/")) for name in bare), bare
    assert "route" not in results["bare"]
    assert (tmp_path / "profile.json").exists()
