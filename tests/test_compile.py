"""torch.compile (default inductor backend) on TinyLM: a whole training step with no graph break,
and cached generation, each equal to eager mode. Compiling takes tens of seconds on two cores, so
there is one test of each; both are marked slow and run by `make test`.

Each runs twice: with inductor's own choice of flags (``-march=native``) and with the code an
Intel AVX-512 CPU gets (``-march=skylake-avx512``: Intel's tuning, which prefers 256-bit vectors).
GCC 12.2 crashed (internal compiler error in ``compute_live_loop_exits``) on the second for a
kernel whose loop bound was ``1 + max(0, s)``, so an AMD or AVX2 machine's CI could pass while
every Intel AVX-512 user failed; the ALiBi table's width no longer carries that ``max`` (see
``masks.offset_range``). The Intel flags need a CPU that runs AVX-512 code; elsewhere that
case is skipped with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import max_err

from relattn.models import TinyLM, TinyLMConfig

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent

# skylake-avx512's instructions: AVX-512 F, CD, BW, DQ, VL on top of AVX2 and FMA.
_SKYLAKE_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()[2:]) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(
    params=[
        pytest.param(None, id="native"),
        pytest.param(
            "skylake-avx512",
            id="intel-avx512",
            marks=pytest.mark.skipif(
                not _SKYLAKE_AVX512 <= _cpu_flags(),
                reason="Intel AVX-512 code needs a CPU with AVX-512 F/CD/BW/DQ/VL to run",
            ),
        ),
    ]
)
def march(request):
    """Inductor's ``-march`` for the C++ it generates (None: its default, ``native``)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.march": request.param}):
        yield request.param
    torch._dynamo.reset()


def tiny(**kw) -> TinyLM:
    torch.manual_seed(0)
    config = {"d_model": 32, "num_heads": 2, "num_layers": 1, "vocab_size": 64, **kw}
    model = TinyLM(TinyLMConfig(**config))
    with torch.no_grad():  # position terms large enough to matter
        for p in model.blocks[0].attn.pe.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def step(model, call, x: torch.Tensor, y: torch.Tensor):
    """Loss and every parameter's gradient of one training step run by ``call``."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(call(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_training_step_equals_eager_without_graph_breaks(march):
    """72 tokens: past the reference backend's tiny-input limit, so ``auto`` runs the chunked
    kernel on the layer's transposed (non-contiguous) q/k/v views, with a learnable T5 table
    and RoPE. ``fullgraph=True`` proves TinyLM's id check makes no graph break."""
    torch._dynamo.reset()
    model = tiny(pe="t5", rope=True)
    idx = torch.randint(0, 64, (2, 73), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    loss, grads = step(model, model, x, y)  # eager
    compiled = torch.compile(model, fullgraph=True)
    loss_c, grads_c = step(model, compiled, x, y)
    assert abs(loss_c.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        assert max_err(grads_c[name], g) <= 1e-4 * (g.abs().max().item() + 1e-6), name
    # Under compile TinyLM checks the id range with an asynchronous assert (reading the values
    # would break the graph): a clear error naming idx, also with several threads, where the
    # compiled embedding's own bounds check would abort the process inside a parallel region.
    bad = x.clone()
    bad[0, 3] = 64
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match=r"idx must be token ids in \[0, vocab_size=64\)"):
            compiled(bad)
    finally:
        torch.set_num_threads(threads)


def test_compiled_generate_equals_eager(march):
    """``model.compile()`` makes generate's prefill and per-token calls compiled; greedy and
    seeded sampling give the eager tokens."""
    torch._dynamo.reset()
    model = tiny(pe="alibi", num_kv_heads=1).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(prompt, 6, temperature=0)
    sampled = model.generate(prompt, 6, temperature=0.8, top_k=10, seed=3)
    model.compile()
    assert torch.equal(model.generate(prompt, 6, temperature=0), greedy)
    assert torch.equal(model.generate(prompt, 6, temperature=0.8, top_k=10, seed=3), sampled)


def test_compiled_with_avx2_kernels(tmp_path):
    """The two tests above again with ATen's AVX2 kernels and inductor's AVX2 code, as an
    AVX2-only CPU runs them (``ATEN_CPU_CAPABILITY=avx2``, read at import: a fresh process).
    Inductor gets a cache folder of its own: run with the cache shared with AVX-512 runs, the
    same model gave NaN logits and glibc heap-corruption aborts (seen 2026-12-06); with a cache
    of its own it is exact."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs a CPU that runs AVX2 code")
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "import torch\n"
        "import test_compile as t\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n"
        "t.test_compiled_training_step_equals_eager_without_graph_breaks(None)\n"
        "t.test_compiled_generate_equals_eager(None)\n"
        "print('avx2 ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "avx2 ok" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
