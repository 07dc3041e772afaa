"""Property-based fuzzing of every command: mutations of what tpusim ships, driven through the CLI.

Inputs are the shipped workloads (workloads/*.yaml, workloads/measured/*.yaml), sweep grids
(workloads/sweeps/), HLO text (traces/real/.../hlo/*.hlo.txt and the hostile corpus; the AOT
modules in the slow tier) and profiles (the real pod viewer, trace JSON and xplane captures),
truncated, bit-flipped, retyped or with values swapped for hostile ones. The property, for every
command: either a clean refusal (exit 2, nothing on stdout, one line on stderr, no traceback, no
output file) or a sane result (positive finite step time, MFU in (0, 1], HBM within capacity,
chips = shape x slices, JSON that parses strictly). The CLI's last-resort "internal error" must
never fire.

Deterministic (``derandomize=True``, no example database): CI runs the same inputs every time. The
default tier generates at least :data:`DEFAULT_TOTAL` inputs (checked, and printed at the end of the
session); ``-m slow`` runs a longer campaign with the same properties.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpusim.cli import INTERNAL_ERROR, main
from conftest import copy_run_folder, reseal_run_folder

REPO = Path(__file__).resolve().parent.parent
V6E = REPO / "traces" / "real" / "tpu-v6e-host-offload"
POD_VIEWER = REPO / "traces" / "real" / "tpu-v2-pod-demo" / "cloud-tpu-v2.pod_viewer.json"
WORKLOADS = sorted((REPO / "workloads").glob("*.yaml")) + sorted((REPO / "workloads" / "measured").glob("*.yaml"))
WORKLOADS = [p for p in WORKLOADS if p.name not in ("models.yaml", "measured.yaml")]
SWEEPS = sorted((REPO / "workloads" / "sweeps").glob("*.yaml"))
HLO_FILES = sorted((V6E / "hlo").glob("*.hlo.txt")) + [REPO / "tests/data/hostile" / n for n in (
    "psum_small.hlo.txt", "loop_1e9.hlo.txt", "recursive_while.hlo.txt", "huge_conv_window.hlo.txt")]
AOT_HLO = sorted((REPO / "traces" / "xla_aot").glob("*/optimized_hlo.txt.gz"))

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
# Examples per test in the default tier (they sum to DEFAULT_TOTAL), and the slow tier's multiplier.
N = {"program": 300, "run": 80, "topology": 250, "collective": 250, "run_hlo": 250, "replay_pod_viewer": 150,
     "replay_trace": 80, "replay_xplane": 6, "compare": 30, "sweep": 15, "search": 8}
DEFAULT_TOTAL = 1000
SLOW_FACTOR = 10
COUNTS: dict[str, int] = {}
OK: dict[str, int] = {}  # of which ended with a result (not a refusal): a fuzzer that only hits errors is weak


def test_the_default_tier_covers_enough_inputs():
    assert sum(N.values()) >= DEFAULT_TOTAL


@pytest.fixture(autouse=True)
def _report(request):
    """Share the counts with conftest's end-of-session line (pytest_terminal_summary)."""
    request.config.tpusim_fuzz_counts = (COUNTS, OK)


# ---- strategies --------------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, -1.5, 0.5, 1e308, -1e308, float("nan"), float("inf"), -float("inf"),
                     10**9, 10**18, 10**30, 2**63, "", "x", "-1", "0", "1e30", "nan", "inf", "null", None, True, False,
                     [], {}, [1, 2], ["silu"], {"a": 1}, "v5e:4x4", "v5p:2x2x2", "16x16", "llama3-8b", "mixtral-8x7b",
                     "full", "minimal", "bfloat16", "float8", "adamw", "dot_product", "TPU v2", "all-gather"]),
    st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


PLAUSIBLE_STRINGS = ["v5e:16x16", "v5e:8x16", "v5e:4x4", "v5p:4x4x4", "v5p:4x4x8", "v6e:8x8", "v4:4x4x4", "tpu7x:4x4x4",
                     "v5e", "v5p", "v6e", "llama3-8b", "llama3-70b", "mixtral-8x7b", "full", "minimal", "none",
                     "save_dot_except_mlp", "bfloat16", "float32", "fp8", "adamw", "sgd", "flash", "dot_product",
                     "causal", "calibrated", "datasheet", "xy", "x", "z", "TPU v2", "TPU v6 Lite"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_tree(data, obj, extra_keys=(), max_ops: int = 3):
    """1..max_ops mutations of a JSON/YAML tree: replace a value, delete a key or item, add a key (one of
    ``extra_keys`` or a typo of an existing one), or retype a container."""
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, max_ops))):
        paths = list(_paths(obj))
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["perturb", "perturb", "perturb", "replace", "replace", "delete", "add"]))
        if not path:
            if op == "replace" and data.draw(st.booleans()):
                obj = copy.deepcopy(data.draw(HOSTILE))
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        value = parent[key]
        if (op == "perturb" and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and abs(value) < 1e15):
            # A near miss: the kind of value a person would write, scaled (often still valid).
            scaled = value * data.draw(st.sampled_from([0, -1, 0.5, 2, 3, 4, 1000, 1e6, 1e-3]))
            parent[key] = int(scaled) if isinstance(value, int) and float(scaled).is_integer() else scaled
        elif op == "perturb" and isinstance(value, str):
            parent[key] = data.draw(st.sampled_from(PLAUSIBLE_STRINGS))
        elif op in ("replace", "perturb"):
            parent[key] = copy.deepcopy(data.draw(HOSTILE))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            names = list(extra_keys) + [str(k) + data.draw(st.sampled_from(["", "x", "_"])) for k in parent]
            parent[data.draw(st.sampled_from(names or ["x"]))] = copy.deepcopy(data.draw(HOSTILE))
        else:
            parent.append(copy.deepcopy(data.draw(HOSTILE)))
    return obj


def mutate_bytes(data, raw: bytes) -> bytes:
    """Truncate, flip bits in, insert into or splice a byte string."""
    op = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    n = len(raw)
    if n == 0:
        return data.draw(st.binary(max_size=16))
    i = data.draw(st.integers(0, n - 1))
    if op == "truncate":
        return raw[:i]
    if op == "flip":
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            j = data.draw(st.integers(0, n - 1))
            out[j] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(out)
    if op == "insert":
        return raw[:i] + data.draw(st.binary(min_size=1, max_size=16)) + raw[i:]
    return raw[:i] + raw[i + data.draw(st.integers(1, 64)):]


NUMBER = re.compile(r"(?<![\w.%])\d+(?![\w.])")


def mutate_hlo(data, text: str) -> str:
    """Line-level mutations of HLO text: numbers swapped for hostile ones, lines deleted, duplicated or cut,
    opcodes renamed, or bytes mutated."""
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["number", "number", "delete", "dup", "cut", "opcode", "bytes"]))
        i = data.draw(st.integers(0, len(lines) - 1)) if lines else 0
        if not lines:
            break
        if op == "number":
            nums = list(NUMBER.finditer(lines[i]))
            if nums:
                m = data.draw(st.sampled_from(nums))
                new = str(data.draw(st.sampled_from([0, 1, 2, 3, 7, 9, 16, 17, 900, 10**9, 10**18, 10**30, -1, -5])))
                lines[i] = lines[i][:m.start()] + new + lines[i][m.end():]
        elif op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "cut":
            lines[i] = lines[i][:data.draw(st.integers(0, len(lines[i])))]
        elif op == "opcode":
            lines[i] = re.sub(r"\b(fusion|add|all-reduce|while|dot|copy-start|copy-done|convolution|broadcast|"
                              r"bitcast|parameter|tuple|constant)\(",
                              data.draw(st.sampled_from(["frobnicate(", "while(", "all-gather(", "dot(", "fusion(",
                                                         "collective-permute(", "convolution(", "("])), lines[i],
                              count=1)
        else:
            lines = mutate_bytes(data, "\n".join(lines).encode()).decode("utf-8", "replace").splitlines()
    return "\n".join(lines) + "\n"


VALID_TOPOLOGIES = st.sampled_from(["v5e:16x16", "v5e:4x4", "v5e:2x2", "v5e:1x1", "v5e:8x16", "v5p:4x4x4",
                                    "v5p:2x2x2", "v5p:4x4x8", "v4:4x4x4", "v6e:2x4", "v6e:8x8", "tpu7x:4x4x4",
                                    "16x16", "4x4x4", "v2:2x2", "v3:4x4"])
TOPOLOGIES = st.one_of(  # valid specs half the time, so that results are checked as often as refusals
    VALID_TOPOLOGIES, VALID_TOPOLOGIES,
    st.sampled_from(["v5e:3x3", "v5e:16x17", "v5e:0x4", "v5e:-1x4", "v5e:1000000x1000000", "v9:4x4", "", ":", "x",
                     "v5e:", "4x4x4x4"]),
    st.builds(lambda c, dims: f"{c}:{'x'.join(map(str, dims))}",
              st.sampled_from(["v5e", "v5p", "v6e", "v4", "tpu7x", "v2", "v3", "TPU v6 Lite", "bogus"]),
              st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 12, 16, 32, 64, 10**6]), min_size=1, max_size=4)),
)


# ---- the property ------------------------------------------------------------------------------------

def invoke(kind: str, args: list, out_paths: tuple[Path, ...] = ()) -> dict | None:
    """Run one command; check the property; return the JSON result when it succeeded with --json."""
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    r = CliRunner().invoke(main, [str(a) for a in args])
    if os.environ.get("TPUSIM_FUZZ_LOG"):  # one line per input, to diff two runs
        with open(os.environ["TPUSIM_FUZZ_LOG"], "a") as f:
            f.write(f"{kind}\t{r.exit_code}\t{' '.join(r.stderr.split())[:200]}\n")
    assert INTERNAL_ERROR not in r.output, (args, r.output)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{args}: {r.exception!r}") from r.exception
    assert r.exit_code in (0, 2), (args, r.exit_code, r.output)
    if r.exit_code == 2:
        lines = r.stderr.strip().splitlines()
        assert r.stdout == "" and len(lines) == 1 and lines[0].startswith("tpusim: error: "), (args, r.output)
        for p in out_paths:
            assert not p.exists() or (p.is_dir() and not any(p.iterdir())), (args, p)
        return None
    OK[kind] = OK.get(kind, 0) + 1
    if "--json" in args:
        return json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON of {args}"))
    return None


def chips_of(name: str) -> int:
    m = re.match(r"^[\w ]+:([\dx]+)(?: \(wraparound[^)]*\))?(?: x(\d+) slices)?$", name)
    assert m, name
    return math.prod(int(d) for d in m.group(1).split("x")) * int(m.group(2) or 1)


def sane_step(d: dict) -> None:
    assert 0 < d["step_time_s"] < math.inf, d["step_time_s"]
    # MFU in (0, 1]; an HLO program without FLOPs (a bare psum) has an MFU of exactly 0.
    assert 0 <= d["mfu"] <= 1 and (d["mfu"] > 0) == (d["model_flops_per_step"] > 0), d["mfu"]
    assert d["chips"] == chips_of(d["topology"])
    if d.get("peak_hbm_bytes_per_device"):
        assert d["peak_hbm_bytes_per_device"] <= d["hbm_capacity_bytes"]


def write(tmp: Path, name: str, content) -> Path:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content)
    else:
        p.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return p


SMALL = {"base_num_decoder_layers": 2}  # workloads shrunk to 2 layers where they simulate, for speed
WORKLOAD_KEYS = ["base_emb_dim", "head_dim", "num_experts", "num_experts_per_tok", "ici_expert_parallelism",
                 "ici_tensor_parallelism", "ici_fsdp_parallelism", "ici_sequence_parallelism", "dcn_data_parallelism",
                 "slices", "topology", "chip", "model_name", "per_device_batch_size", "max_target_length",
                 "remat_policy", "physical_axes", "mlp_activations", "vocab_size", "weight_dtype", "steps"]


def _workload(data, shrink: bool) -> dict:
    base = yaml.safe_load(data.draw(st.sampled_from(WORKLOADS)).read_text())
    if shrink:
        base.setdefault("model", {}).update(SMALL)
    return mutate_tree(data, base, WORKLOAD_KEYS)


# ---- the commands ------------------------------------------------------------------------------------

def _fuzz(name: str, strategy_test, factor: int = 1, n: int | None = None) -> None:
    n = (n or N[name]) * factor
    before = COUNTS.get(name, 0)
    settings(FUZZ, max_examples=n)(strategy_test)()
    assert COUNTS.get(name, 0) - before >= 0.9 * n, (name, COUNTS.get(name, 0) - before, n)


def fuzz_program(factor=1):
    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            w = write(Path(tmp), "w.yaml", _workload(data, shrink=factor == 1 or data.draw(st.booleans())))
            args = ["program", w, "--json"]
            if data.draw(st.booleans()):
                args += ["--topology", data.draw(TOPOLOGIES)]
            if data.draw(st.booleans()):
                args += ["--slices", data.draw(st.sampled_from(["0", "1", "2", "-3", "4097", "1000000000", "x"]))]
            d = invoke("program", args)
            if d is not None:
                assert d["chips"] == chips_of(d["topology"])
                assert 0 < d["model_flops_per_step"] < math.inf and 0 < d["flops_per_device"] < math.inf
                assert d["peak_hbm_bytes_per_device"] <= d["hbm_capacity_bytes"]
    _fuzz("program", t, factor)


def fuzz_run(factor=1):
    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            w = write(Path(tmp), "w.yaml", _workload(data, shrink=True))
            args = ["run", w, "--json"]
            if data.draw(st.booleans()):
                args += ["--topology", data.draw(TOPOLOGIES)]
            if data.draw(st.booleans()):
                dev = data.draw(st.sampled_from(["0", "3", "255", "-1", "100000", "x"]))
                args += ["--straggler", f"{dev}={data.draw(st.sampled_from(['1.5', '0', 'inf', 'nan', '1e9', '-2']))}"]
            if data.draw(st.booleans()):
                args += ["--mode", "datasheet"]
            d = invoke("run", args)
            if d is not None:
                sane_step(d)
    _fuzz("run", t, factor)


# A coherent command half the time (valid topology, slices and oversubscription, axes the slice has),
# so that results are checked as often as refusals; a mix of anything otherwise.
COHERENT = st.sampled_from([("v5e:16x16", "x"), ("v5e:16x16", "xy"), ("v5e:8x16", "y"), ("v5p:4x4x4", "xyz"),
                            ("v5p:4x4x8", "z"), ("v4:4x4x4", "xy"), ("v6e:8x8", "x"), ("tpu7x:4x4x4", "yz"),
                            ("v5e:2x2", "x"), ("16x16", "xy"), ("4x4x4", "x")])


def fuzz_topology(factor=1):
    @given(st.one_of(st.tuples(COHERENT.map(lambda c: c[0]), st.sampled_from(["1", "2", "4", "64"]),
                               st.sampled_from(["1", "1.5", "4"])),
                     st.tuples(TOPOLOGIES,
                               st.sampled_from(["1", "2", "0", "-1", "4096", "4097", "1000000000", "1.5"]),
                               st.sampled_from(["1", "2.5", "0.5", "nan", "inf", "-1"]))))
    def t(args):
        spec, slices, over = args
        d = invoke("topology", ["topology", spec, "--slices", slices, "--dcn-oversubscription", over, "--json"])
        if d is not None:
            assert d["chips"] == math.prod(d["shape"]) * d["slices"] and d["ici_links"] >= 0
            assert 0 < d["peak_bf16_flops_per_s"] < math.inf
    _fuzz("topology", t, factor)


def fuzz_collective(factor=1):
    kinds = ["all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"]
    good_bytes = st.sampled_from(["34e6", "34MB", "1GiB", "1e9", "2.5e8", "1e15", "1 kB", "5KiB", "1e-300", "1"])
    coherent = st.tuples(st.sampled_from(kinds), good_bytes, COHERENT, st.sampled_from(["1", "2"])).map(
        lambda a: (a[0], a[1], a[2][0], (a[2][1] if a[0] != "collective-permute" else a[2][1][:1])
                   + (",dcn" if a[3] == "2" and a[0] != "collective-permute" else ""), a[3]))
    anything = st.tuples(
        st.sampled_from([*kinds, "psum", "", "ALL-GATHER"]),
        st.one_of(good_bytes, st.sampled_from(["1e30", "0", "-5", "nan", "inf", "", "x", "1e400"]), st.text(max_size=8)),
        TOPOLOGIES,
        st.sampled_from(["x", "y", "z", "xy", "xyz", "dcn", "xy,dcn", "x,x", "q", "", "dcn,dcn", "yx"]),
        st.sampled_from(["1", "2", "0", "5000"]))

    @given(st.one_of(coherent, anything))
    def t(args):
        kind, nbytes, topo, axes, slices = args
        d = invoke("collective", ["collective", kind, "--bytes", nbytes, "--topology", topo, "--axes", axes,
                                  "--slices", slices, "--json"])
        if d is not None:
            assert 0 <= d["time_s"] < math.inf and 0 < d["bytes"] <= 1e15
    _fuzz("collective", t, factor)


def fuzz_run_hlo(factor=1, files=HLO_FILES, n=None):
    texts = [(p.name, (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).decode())
             for p in files]

    @given(st.data())
    def t(data):
        name, text = data.draw(st.sampled_from(texts))
        with tempfile.TemporaryDirectory() as tmp:
            h = write(Path(tmp), name.removesuffix(".gz"), mutate_hlo(data, text))
            topo = data.draw(st.sampled_from(["v6e:2x4", "v6e:2x2", "v5e:1x1", "v5e:4x4", "v6e:4x4", "v5p:2x2x2"]))
            d = invoke("run_hlo", ["run", "--hlo", h, "--topology", topo, "--json"])
            if d is not None:
                sane_step(d)
    _fuzz("run_hlo", t, factor, n)


def fuzz_replay_pod_viewer(factor=1):
    doc = json.loads(POD_VIEWER.read_text())

    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            if data.draw(st.integers(0, 4)) == 0:
                content = mutate_bytes(data, POD_VIEWER.read_bytes())
            else:
                content = json.dumps(mutate_tree(data, doc))
            p = write(Path(tmp), "x.pod_viewer.json", content)
            d = invoke("replay_pod_viewer", ["replay", p, "--json"])
            if d is not None:
                assert all(0 <= o["simulated_s"] < math.inf for o in d["ops"])
    _fuzz("replay_pod_viewer", t, factor)


@pytest.fixture(scope="module")
def small_trace() -> list:
    """The v6e capture's trace JSON cut to its metadata and the first 400 events of its TPU process."""
    events = json.loads(gzip.decompress((V6E / "tpu_inference_2.trace.json.gz").read_bytes()))["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    tpu_pids = {e["pid"] for e in meta if e.get("name") == "process_name" and "TPU" in str(e.get("args"))}
    xs = [e for e in events if e.get("ph") == "X" and e.get("pid") in tpu_pids][:400]
    return meta + xs


def fuzz_replay_trace(small_trace, factor=1):
    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            events = copy.deepcopy(small_trace)
            for _ in range(data.draw(st.integers(1, 4))):
                i = data.draw(st.integers(0, len(events) - 1))
                events[i] = mutate_tree(data, events[i], ["args", "pid", "tid", "ts", "dur", "ph", "name"], max_ops=2)
            raw = gzip.compress(json.dumps({"traceEvents": events}).encode())
            if data.draw(st.integers(0, 3)) == 0:
                raw = mutate_bytes(data, raw)
            p = write(Path(tmp), "x.trace.json.gz", raw)
            args = ["replay", p, "--json"] + (["--topology", "v6e:2x4"] if data.draw(st.integers(0, 4)) else [])
            d = invoke("replay_trace", args)
            if d is not None:
                assert all(o["simulated_s"] is None or 0 <= o["simulated_s"] < math.inf for o in d["ops"])
    _fuzz("replay_trace", t, factor)


def fuzz_replay_xplane(factor=1):
    raw = (V6E / "tpu_inference_2.xplane.pb").read_bytes()

    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            p = write(Path(tmp), "x.xplane.pb", mutate_bytes(data, raw))
            invoke("replay_xplane", ["replay", p, "--json"])
    _fuzz("replay_xplane", t, factor)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    r = CliRunner().invoke(main, ["run", "--hlo", str(V6E / "hlo" / "jit_f.hlo.txt"), "--topology", "v6e:2x2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def fuzz_compare(run_dir, small_trace, factor=1):
    summary = json.loads((run_dir / "summary.json").read_text())

    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            run = copy_run_folder(run_dir, Path(tmp) / "run")
            target = data.draw(st.sampled_from(["summary", "timeline", "trace", "profile"]))
            if target == "summary":
                write(run, "summary.json", json.dumps(mutate_tree(data, summary)))
            elif target in ("timeline", "trace"):
                name = "timeline.parquet" if target == "timeline" else "trace.json.gz"
                write(run, name, mutate_bytes(data, (run / name).read_bytes()))
            reseal_run_folder(run)  # past the manifest check, to the content checks
            events = copy.deepcopy(small_trace)
            if target == "profile":
                i = data.draw(st.integers(0, len(events) - 1))
                events[i] = mutate_tree(data, events[i], ["args", "pid", "ts", "dur"], max_ops=2)
            prof = write(Path(tmp), "p.trace.json.gz", gzip.compress(json.dumps({"traceEvents": events}).encode()))
            d = invoke("compare", ["compare", run, prof, "--json", "--trace", Path(tmp) / "t.json.gz"],
                       out_paths=(Path(tmp) / "t.json.gz",))
            if d is not None:
                assert 0 < d["step_time_s"]["simulated"] < math.inf
    _fuzz("compare", t, factor)


def fuzz_sweep(factor=1):
    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            w = yaml.safe_load(data.draw(st.sampled_from(WORKLOADS)).read_text())
            w.setdefault("model", {}).update(SMALL)
            write(Path(tmp), "w.yaml", w)
            grid = yaml.safe_load(data.draw(st.sampled_from(SWEEPS)).read_text())
            grid["workload"] = "w.yaml"
            grid.pop("topologies", None)
            grid["vary"] = {k: v[:2] for k, v in list(grid["vary"].items())[:1]}  # at most 2 configurations
            grid = mutate_tree(data, grid, ["topology", "slices", "mode", "vary", "topologies"], max_ops=2)
            g = write(Path(tmp), "grid.yaml", grid)
            out = Path(tmp) / "rows.parquet"
            d = invoke("sweep", ["sweep", g, "--workers", "1", "--out", out, "--json"], out_paths=(out,))
            if d is not None:
                for row in d["rows"]:
                    assert row["status"] in ("ok", "infeasible", "invalid")
                    if row["status"] == "ok" and "serving" in w:  # a serving workload: serve's fields
                        assert 0 < row["throughput.output_tokens_per_s"] < math.inf and row["ttft_s.p50"] >= 0
                        assert row["hbm_per_device.total"] <= row["hbm_per_device.capacity"]
                    elif row["status"] == "ok":
                        sane_step(row)
    _fuzz("sweep", t, factor)


def fuzz_search(factor=1):
    @given(st.data())
    def t(data):
        with tempfile.TemporaryDirectory() as tmp:
            w = write(Path(tmp), "w.yaml", _workload(data, shrink=True))
            topo = data.draw(st.sampled_from(["v5e:2x2", "v5p:2x2x2", "v6e:2x4", "v5e:1x1"]))
            d = invoke("search", ["search", w, "--topology", topo, "--budget", "2", "--top", "1", "--workers", "1",
                                  "--keep-global-batch", "--remat", "full", "--json"])
            if d is not None:
                for p in d["top"]:
                    assert 0 < p["step_time_s"] < math.inf and 0 < p["mfu"] <= 1
    _fuzz("search", t, factor)


# ---- the tiers ---------------------------------------------------------------------------------------

def test_fuzz_program():
    fuzz_program()


def test_fuzz_run():
    fuzz_run()


def test_fuzz_topology():
    fuzz_topology()


def test_fuzz_collective():
    fuzz_collective()


def test_fuzz_run_hlo():
    fuzz_run_hlo()


def test_fuzz_replay_pod_viewer():
    fuzz_replay_pod_viewer()


def test_fuzz_replay_trace(small_trace):
    fuzz_replay_trace(small_trace)


def test_fuzz_replay_xplane():
    fuzz_replay_xplane()


def test_fuzz_compare(run_dir, small_trace):
    fuzz_compare(run_dir, small_trace)


def test_fuzz_sweep():
    fuzz_sweep()


def test_fuzz_search():
    fuzz_search()


@pytest.mark.slow
def test_fuzz_long_campaign(run_dir, small_trace):
    """Every command, SLOW_FACTOR times the default examples, plus the AOT-compiled modules."""
    for fn in (fuzz_program, fuzz_run, fuzz_topology, fuzz_collective, fuzz_run_hlo, fuzz_replay_pod_viewer,
               fuzz_replay_xplane, fuzz_sweep, fuzz_search):
        fn(factor=SLOW_FACTOR)
    fuzz_replay_trace(small_trace, factor=SLOW_FACTOR)
    fuzz_compare(run_dir, small_trace, factor=SLOW_FACTOR)
    fuzz_run_hlo(files=AOT_HLO, n=40)  # ~3 s each: the 6,000-line modules
