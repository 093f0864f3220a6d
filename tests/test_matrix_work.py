"""The guards' per-matrix work is fast without changing what it measures: matrices on a few
threads with results in order, the exact σ from the small Gram matrix, numpy's BLAS kept to
one thread, each pair's balancing scale and each model's transform plan formed once."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")


def test_map_matrices_keeps_order_and_stays_a_bounded_number_of_items_ahead():
    from invarlock.guards.measure.weights import map_matrices

    workers = 2
    done = []  # item numbers whose call has returned
    lock = threading.Lock()
    formed_ahead = []
    threads, inference = set(), set()

    def items():
        for j in range(40):
            with lock:  # how many items are formed but not yet finished
                formed_ahead.append(j - len(done))
            yield j

    def fn(j):
        threads.add(threading.current_thread().name)
        inference.add(torch.is_inference_mode_enabled())
        with lock:
            done.append(j)
        return j * j

    out = map_matrices(fn, items(), workers, lambda j: torch.empty(0))
    assert out == [j * j for j in range(40)]
    assert max(formed_ahead) <= workers  # the results of all but the last `workers` are in
    assert threads and all(t.startswith("invarlock-matrix") for t in threads)
    assert inference == {True}  # each worker enters inference mode itself


def test_map_matrices_with_one_worker_runs_on_the_calling_thread():
    from invarlock.guards.measure.weights import map_matrices

    names = []
    out = map_matrices(lambda j: names.append(threading.current_thread().name) or -j,
                       range(5), 1, lambda j: torch.empty(0))
    assert out == [0, -1, -2, -3, -4]
    assert set(names) == {threading.current_thread().name}


def test_map_matrices_passes_a_worker_error_on():
    from invarlock.guards.measure.weights import map_matrices

    def fn(j):
        if j == 3:
            raise ValueError("bad matrix")
        return j

    with pytest.raises(ValueError, match="bad matrix"):
        map_matrices(fn, range(10), 2, lambda j: torch.empty(0))


@pytest.mark.parametrize("shape", [(192, 576), (576, 192), (40, 40), (7, 1), (1, 7)])
def test_exact_top_is_the_svd_top_pair(shape):
    from invarlock.guards.measure.weights import exact_top

    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen)
    w[0] *= 3  # a gap at the top, so the vector is defined
    _, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = exact_top(w)
    assert top.exact and top.sigma == pytest.approx(float(s[0]), rel=1e-6)
    assert abs(float(top.vector.double() @ vh[0])) == pytest.approx(1.0, abs=1e-5)
    assert float(top.vector.norm()) == pytest.approx(1.0, abs=1e-6)


def test_exact_top_of_a_zero_or_non_finite_matrix():
    from invarlock.guards.measure.weights import exact_top

    zero = exact_top(torch.zeros(3, 5))
    assert zero.sigma == 0.0 and float(zero.vector.norm()) == 1.0
    bad = torch.ones(4, 3)
    bad[1, 2] = float("nan")
    assert exact_top(bad).sigma == float("inf")


def test_single_thread_also_keeps_numpy_blas_on_one_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy as np  # noqa: F401 - its BLAS is the pool this is about

    from invarlock.guards.measure.weights import single_thread

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info()
                if p["user_api"] == "blas"]

    outside = blas_threads()
    assert outside, "numpy's BLAS was not found"
    with single_thread():
        assert set(blas_threads()) == {1}
        assert torch.get_num_threads() == 1
    assert blas_threads() == outside


def test_the_memo_changes_no_effective_matrix(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import effective, input_scales, transform_plan

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    params = dict(model.named_parameters())
    plan = transform_plan(model)
    reads = []

    def get(name):
        reads.append(name)
        return params[name].detach()

    memo: dict = {}
    paired = [n for n, e in plan.items() if "balance" in e]
    assert paired
    for name in paired:
        assert torch.equal(effective(name, get, plan, memo), effective(name, get, plan))
        scale = input_scales(name, get, plan, memo=memo)
        plain = input_scales(name, get, plan)
        assert (scale is None) == (plain is None)
        assert scale is None or torch.equal(scale, plain)
    pairs = {rel["a"]["weight"] + rel["b"]["weight"] for n in paired
             for rel in plan[n]["balance"]["relations"]}
    # one balancing scale and one class norm per pair, however many sides asked
    assert len(memo) == 2 * len(pairs)


def test_a_walk_of_effective_matrices_reads_each_paired_weight_once(tiny_llama_dir):
    """With a memo, a pair's norms are taken from the folded matrices its sides' own
    `effective` calls form (the partner's waits for its call and is then dropped): each
    weight is read once per walk, and nothing is left waiting at the end."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import FOLDING, effective, transform_plan
    from invarlock.guards.measure.spectral import matrices

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    params = dict(model.named_parameters())
    plan = transform_plan(model)
    reads: list[str] = []

    def get(name):
        reads.append(name)
        return params[name].detach()

    names = [name for name, _ in matrices(model)]
    paired = {n for n, e in plan.items() if "balance" in e}
    assert paired <= set(names)
    for memo in ({}, None):
        reads.clear()
        walked = {name: effective(name, get, plan, memo) for name in names}
        counts = {name: reads.count(name) for name in paired}
        if memo is None:  # without one, a pair's norms read both sides again
            assert max(counts.values()) > 1
            continue
        assert set(counts.values()) == {1}
        assert not [key for key in memo if key.startswith(FOLDING)]
        for name in names:
            torch.testing.assert_close(walked[name], effective(name, get, plan), rtol=0, atol=0)


def test_a_subject_walk_aligned_with_its_baseline_reads_each_weight_once(tiny_llama_dir):
    """The spectral walk over both models (subject with its signs against the baseline, then
    the baseline): the baseline's sides read for the signs are handed over to its own
    `effective` calls, so each paired weight of either model is still read once, nothing is
    left waiting, and the baseline's matrices are the memo-less ones."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import FOLDING, Reference, effective, transform_plan
    from invarlock.guards.measure.spectral import matrices

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    subject = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        for p in subject.parameters():
            p.mul_(1.01)
    plan = transform_plan(base)
    reads: dict[str, list[str]] = {"base": [], "subject": []}

    def getter(model, role):
        params = dict(model.named_parameters())

        def get(name):
            reads[role].append(name)
            return params[name].detach()
        return get

    base_get, subject_get = getter(base, "base"), getter(subject, "subject")
    base_memo, subject_memo = {}, {}
    reference = Reference(base_get, base_memo, hand_over=True)
    paired = {n for n, e in plan.items() if "balance" in e}
    walked = {}
    for name, _ in matrices(base):
        effective(name, subject_get, plan, subject_memo, reference)
        walked[name] = effective(name, base_get, plan, base_memo)
    for role in reads:
        assert {reads[role].count(name) for name in paired} == {1}, role
    for memo in (base_memo, subject_memo):
        assert not [key for key in memo if key.startswith(FOLDING)]
    for name, w in walked.items():
        torch.testing.assert_close(w, effective(name, getter(base, "base"), plan), rtol=0,
                                   atol=0)


def test_transform_plan_is_traced_once_per_model_and_handed_out_as_a_copy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import transform_plan

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    first = transform_plan(model)
    second = transform_plan(model)
    assert len(calls) == 1
    assert first == second and first is not second
    first.clear()
    assert transform_plan(model) == second
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    other.register_forward_pre_hook(lambda *_: calls.append(1))
    transform_plan(other)
    assert len(calls) == 2  # another model object is traced for itself


def test_spectral_records_do_not_depend_on_the_number_of_threads(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure import spectral
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.models.source import weight_files

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    subject = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in subject.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std())
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(spectral, "matrix_workers", lambda device, w=workers: w)
        probe = spectral.SpectralProbe({})
        probe.baseline_loaded(base)
        state = probe.baseline_state()
        ctx = SubjectContext(info=None, model=subject, config={}, baseline_config={},
                             baseline_files=weight_files(tiny_llama_dir),
                             tokenizer_hashes=("", ""), base_model_prefix="model")
        probe.subject_loaded(ctx, state)
        results.append((state["modules"], probe.measure(ctx, state)["modules"]))
    changed = [m for m in results[0][1] if m["changed"]]
    assert len(changed) > 10
    assert results[1] == results[0] and results[2] == results[0]


def test_large_plain_matrices_read_by_row_blocks_give_the_same_records(tiny_llama_dir,
                                                                         monkeypatch):
    """An embedding or head compared by row blocks read from the files (never whole beside
    its difference) is recorded exactly as when it is read whole, a lying cached σ_b
    included."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure import spectral, weights
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.models.source import weight_files

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    subject = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embed = subject.get_input_embeddings().weight
        rows = torch.randperm(embed.shape[0], generator=gen)[:8]
        embed[rows] = embed[rows.flip(0)].clone()  # eight rows swapped around
        embed[3] *= 4.0  # and one spiked
    probe = spectral.SpectralProbe({})
    probe.baseline_loaded(base)
    state = probe.baseline_state()
    embed_name = next(m["name"] for m in state["modules"] if "embed" in m["name"])
    lying = {**state, "modules": [{**m, "sigma": m["sigma"] * 0.5} if m["name"] == embed_name
                                  else m for m in state["modules"]]}
    blockwise = []
    real_difference = spectral.BaselineRows.difference
    monkeypatch.setattr(spectral.BaselineRows, "difference",
                        lambda self, ws, start: blockwise.append(self.rows)
                        or real_difference(self, ws, start))

    def records(cached: dict, limit: int) -> list[dict]:
        monkeypatch.setattr(weights, "ROW_BLOCKS_MIN_ELEMENTS", limit)
        monkeypatch.setattr(weights, "ROW_BLOCK_ELEMENTS", 3 * embed.shape[1])  # 3 rows
        ctx = SubjectContext(info=None, model=subject, config={}, baseline_config={},
                             baseline_files=weight_files(tiny_llama_dir),
                             tokenizer_hashes=("", ""), base_model_prefix="model")
        probe.subject_loaded(ctx, cached)
        return probe.measure(ctx, cached)["modules"]

    for cached in (state, lying):
        whole = records(cached, 2**62)
        assert blockwise == []
        by_rows = records(cached, 1)
        assert embed_name in {m["name"] for m in by_rows} and len(blockwise) >= 1
        blockwise.clear()
        changed = next(m for m in whole if m["name"] == embed_name)
        assert changed["changed"] and changed["edit_size"] > 0
        if cached is lying:
            assert changed["sigma_baseline_cached"] == pytest.approx(
                0.5 * changed["sigma_baseline"], rel=1e-6)
            # the files' σ_b from W_s − ΔW instead of the file's matrix: equal to rounding
            pairs = zip(whole, by_rows, strict=True)
            assert all(a["sigma_baseline"] == pytest.approx(b["sigma_baseline"], rel=1e-6)
                       for a, b in pairs)
            for records_ in (whole, by_rows):
                for m in records_:
                    m.pop("sigma_baseline", None)
                    m.pop("edit_size", None)
        assert by_rows == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_safetensors_rows_read_exactly_the_rows_asked_for(tmp_path, dtype):
    from safetensors.torch import save_file

    from invarlock.guards.measure.weights import WeightReader, safetensors_rows

    gen = torch.Generator().manual_seed(2)
    matrix = (torch.randn(37, 11, generator=gen) * 20).to(dtype)
    path = tmp_path / "model.safetensors"
    save_file({"a.bias": torch.ones(5), "b.weight": matrix}, str(path))
    rows, shape = safetensors_rows(path, "b.weight")
    assert shape == (37, 11)
    for lo, hi in ((0, 37), (0, 1), (5, 19), (36, 37), (12, 12)):
        block = rows(lo, hi)
        assert block.dtype == dtype and torch.equal(block, matrix[lo:hi])
    with pytest.raises(IndexError):
        rows(30, 38)
    assert safetensors_rows(path, "a.bias") is None  # not a matrix: read whole
    assert safetensors_rows(path, "missing") is None
    found = WeightReader([path]).row_reader("b.weight")
    assert found is not None and torch.equal(found[0](3, 9), matrix[3:9])


@pytest.mark.parametrize("workers", [1, 2])
def test_the_heap_is_handed_back_every_few_dozen_matrices(monkeypatch, workers):
    from invarlock.guards.measure import weights

    trims = []
    monkeypatch.setattr(weights, "trim_host_memory", lambda: trims.append(1) or True)
    out = weights.map_matrices(lambda i: i * i, range(2 * weights.TRIM_EVERY + 5), workers,
                               lambda _i: torch.empty(0))
    assert out == [i * i for i in range(2 * weights.TRIM_EVERY + 5)]
    assert len(trims) == 2


def test_safetensors_rows_decline_a_header_that_lies(tmp_path):
    """The files are untrusted: a header too long to be real, or offsets past the end of the
    file, give no row reader (the whole-tensor read then reports the file in its own words)."""
    import struct

    from safetensors.torch import save_file

    from invarlock.guards.measure.weights import safetensors_rows

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert safetensors_rows(huge, "w") is None
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(64, 8)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])  # the data section cut short
    assert safetensors_rows(path, "w") is None
