"""Bad-input corpus for the model side: TinyLMConfig, TinyLM (construction, forward, generate,
new_cache, save, load) and KVCache. Each row is one wrong call, the exception it must raise
(TypeError for a wrong type, ValueError for a wrong value, FileNotFoundError for a missing file)
and a regex the message must match: the argument's name, and what was expected where useful."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from relattn import KVCache
from relattn.models import TinyLM, TinyLMConfig

CONFIG = {"d_model": 16, "num_heads": 2, "num_layers": 1, "vocab_size": 32, "max_seq_len": 16}
LONG = torch.long


@functools.cache
def model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMConfig(**CONFIG)).eval()


def ids(*shape: int, dtype=LONG, fill: int = 1) -> torch.Tensor:
    return torch.full(shape, fill, dtype=dtype)


def config(**kw) -> TinyLMConfig:
    return TinyLMConfig(**{**CONFIG, **kw})


def edited_config(**kw) -> TinyLMConfig:
    c = config()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def forward(idx, **kw):
    with torch.no_grad():
        return model()(idx, **kw)


def generate(prompt=None, max_new_tokens=2, **kw):
    prompt = ids(1, 3) if prompt is None else prompt
    return model().generate(prompt, max_new_tokens, **kw)


def full_cache():
    cache = model().new_cache(1, capacity=2)
    forward(ids(1, 2), cache=cache)
    return cache


def cache(**kw) -> KVCache:
    args = {"num_layers": 1, "batch_size": 1, "num_kv_heads": 1, "head_dim": 8, "capacity": 4}
    return KVCache(**{**args, **kw})


def update(k=None, v=None, **kw):
    layer = cache().layer(0)
    good = torch.zeros(1, 1, 2, 8)
    return layer.update(good if k is None else k, good if v is None else v, **kw)


def saved(tmp: Path, edit=None) -> Path:
    """A checkpoint folder in ``tmp``, then ``edit(folder)`` applied to it."""
    folder = tmp / "ckpt"
    model().save(folder)
    if edit is not None:
        edit(folder)
    return folder


def edit_config(change):
    def edit(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        change(data)
        (folder / "config.json").write_text(json.dumps(data))

    return edit


def truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def weights_of_other_model(folder: Path) -> None:
    torch.manual_seed(1)
    other = TinyLM(config(rope=True))
    other.save(folder.parent / "other")
    (folder / "model.safetensors").write_bytes(
        (folder.parent / "other/model.safetensors").read_bytes()
    )


def corrupt_recorded_config(folder: Path) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "relattn.config": "[1, 2"}
    save_file(dict(model().state_dict()), str(folder / "model.safetensors"), metadata=metadata)


def foreign_file(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


TE, VE, FNF = TypeError, ValueError, FileNotFoundError

# (id, call(tmp_path), exception type, regex)
ROWS = [
    # ---- TinyLMConfig
    ("config vocab_size 0", lambda t: config(vocab_size=0), VE, r"config\.vocab_size.*>= 1"),
    ("config vocab_size float", lambda t: config(vocab_size=1.5), TE, r"config\.vocab_size"),
    ("config vocab_size str", lambda t: config(vocab_size="32"), TE, r"config\.vocab_size"),
    ("config vocab_size bool", lambda t: config(vocab_size=True), TE, r"config\.vocab_size"),
    ("config d_model 0", lambda t: config(d_model=0), VE, r"config\.d_model"),
    (
        "config d_model not multiple",
        lambda t: config(d_model=30, num_heads=4),
        VE,
        r"config\.d_model must be a multiple of config\.num_heads",
    ),
    ("config num_layers -1", lambda t: config(num_layers=-1), VE, r"config\.num_layers"),
    ("config num_layers None", lambda t: config(num_layers=None), TE, r"config\.num_layers"),
    ("config num_heads 0", lambda t: config(num_heads=0), VE, r"config\.num_heads"),
    ("config num_kv_heads 0", lambda t: config(num_kv_heads=0), VE, r"config\.num_kv_heads"),
    ("config num_kv_heads float", lambda t: config(num_kv_heads=1.0), TE, r"config\.num_kv_heads"),
    (
        "config num_kv_heads not dividing",
        lambda t: config(num_heads=4, num_kv_heads=3),
        VE,
        r"config\.num_kv_heads must divide",
    ),
    ("config pe unknown", lambda t: config(pe="rotary"), VE, r"config\.pe must be one of"),
    ("config pe None", lambda t: config(pe=None), TE, r"config\.pe"),
    ("config pe int", lambda t: config(pe=5), TE, r"config\.pe"),
    ("config rope int", lambda t: config(rope=1), TE, r"config\.rope must be a bool"),
    ("config rope str", lambda t: config(rope="no"), TE, r"config\.rope must be a bool"),
    (
        "config rope odd head dim",
        lambda t: config(d_model=6, num_heads=2, rope=True),
        VE,
        r"config\.rope.*even head dim",
    ),
    (
        "config pe rope odd head dim",
        lambda t: config(d_model=6, num_heads=2, pe="rope"),
        VE,
        r"even head dim",
    ),
    ("config mlp_ratio 0", lambda t: config(mlp_ratio=0), VE, r"config\.mlp_ratio"),
    ("config dropout 1", lambda t: config(dropout=1.0), VE, r"config\.dropout.*\[0, 1\)"),
    ("config dropout negative", lambda t: config(dropout=-0.1), VE, r"config\.dropout"),
    ("config dropout nan", lambda t: config(dropout=float("nan")), VE, r"config\.dropout"),
    ("config dropout str", lambda t: config(dropout="0.1"), TE, r"config\.dropout"),
    ("config max_seq_len 0", lambda t: config(max_seq_len=0), VE, r"config\.max_seq_len"),
    ("config max_seq_len 2**64", lambda t: config(max_seq_len=2**64), VE, r"config\.max_seq_len"),
    ("config backend unknown", lambda t: config(backend="gpu"), VE, r"config\.backend must be one"),
    ("config backend None", lambda t: config(backend=None), TE, r"config\.backend"),
    # ---- TinyLM construction
    ("TinyLM dict config", lambda t: TinyLM(dict(CONFIG)), TE, r"config must be a TinyLMConfig"),
    ("TinyLM None config", lambda t: TinyLM(None), TE, r"config must be a TinyLMConfig"),
    ("TinyLM edited config", lambda t: TinyLM(edited_config(num_heads=3)), VE, r"config\.d_model"),
    ("TinyLM edited rope", lambda t: TinyLM(edited_config(rope="yes")), TE, r"config\.rope"),
    # ---- forward
    ("forward idx list", lambda t: forward([[1, 2]]), TE, r"idx must be a \(B, N\) integer"),
    (
        "forward idx float",
        lambda t: forward(ids(1, 2, dtype=torch.float32)),
        TE,
        r"idx must be an integer tensor.*float32",
    ),
    ("forward idx bool", lambda t: forward(ids(1, 2, dtype=torch.bool)), TE, r"idx.*torch\.bool"),
    ("forward idx complex", lambda t: forward(ids(1, 2, dtype=torch.complex64)), TE, r"idx"),
    ("forward idx 1-D", lambda t: forward(ids(4)), VE, r"idx must have shape \(B, N\); got \(4,\)"),
    ("forward idx 3-D", lambda t: forward(ids(1, 2, 2)), VE, r"idx must have shape \(B, N\)"),
    ("forward idx empty", lambda t: forward(ids(1, 0)), VE, r"idx must hold at least one token"),
    (
        "forward idx = vocab",
        lambda t: forward(ids(1, 2, fill=32)),
        VE,
        r"idx must be token ids in \[0, vocab_size=32\); got values in \[32, 32\]",
    ),
    ("forward idx negative", lambda t: forward(ids(1, 2, fill=-1)), VE, r"idx.*\[-1, -1\]"),
    (
        "forward idx uint8 too big",
        lambda t: forward(ids(1, 2, dtype=torch.uint8, fill=200)),
        VE,
        r"idx.*vocab_size",
    ),
    (
        "forward idx wrong device",
        lambda t: forward(ids(1, 2).to("meta")),
        VE,
        r"idx must be on the model's device",
    ),
    (
        "forward cache str",
        lambda t: forward(ids(1, 2), cache="cache"),
        TE,
        r"cache must be a KVCache",
    ),
    (
        "forward cache layers",
        lambda t: forward(ids(1, 2), cache=KVCache(3, 1, 2, 8, 8)),
        VE,
        r"cache has \(num_layers, num_kv_heads, head_dim\) = \(3, 2, 8\)",
    ),
    (
        "forward cache head_dim",
        lambda t: forward(ids(1, 2), cache=KVCache(1, 1, 2, 4, 8)),
        VE,
        r"cache has .*needs \(1, 2, 8\)",
    ),
    (
        "forward cache batch",
        lambda t: forward(ids(2, 2), cache=model().new_cache(1)),
        VE,
        r"cache was built for batch_size=1; idx has B=2",
    ),
    (
        "forward cache dtype",
        lambda t: forward(ids(1, 2), cache=KVCache(1, 1, 2, 8, 8, dtype=torch.float64)),
        VE,
        r"cache holds torch\.float64",
    ),
    (
        "forward cache full",
        lambda t: forward(ids(1, 1), cache=full_cache()),
        VE,
        r"overflow.*capacity=2",
    ),
    ("forward window 0", lambda t: forward(ids(1, 2), window=0), VE, r"window"),
    ("forward window float", lambda t: forward(ids(1, 2), window=1.5), TE, r"window"),
    ("forward doc_ids shape", lambda t: forward(ids(1, 2), doc_ids=ids(1, 3)), VE, r"doc_ids"),
    (
        "forward key_padding_mask dtype",
        lambda t: forward(ids(1, 2), key_padding_mask=ids(1, 2)),
        TE,
        r"key_padding_mask",
    ),
    # ---- generate
    ("generate prompt list", lambda t: generate([1, 2, 3]), TE, r"prompt_ids must be .*tensor"),
    ("generate prompt str", lambda t: generate("hello"), TE, r"prompt_ids.*got str"),
    ("generate prompt bytes", lambda t: generate(b"hello"), TE, r"prompt_ids.*got bytes"),
    (
        "generate prompt float",
        lambda t: generate(ids(1, 3, dtype=torch.float64)),
        TE,
        r"prompt_ids must be an integer tensor",
    ),
    (
        "generate prompt 3-D",
        lambda t: generate(ids(1, 1, 3)),
        VE,
        r"prompt_ids must have shape \(B, N\) or \(N,\); got \(1, 1, 3\)",
    ),
    ("generate prompt 0-D", lambda t: generate(torch.tensor(3)), VE, r"prompt_ids must have shape"),
    ("generate prompt empty", lambda t: generate(ids(1, 0)), VE, r"prompt_ids must hold at least"),
    (
        "generate prompt = vocab",
        lambda t: generate(ids(3, fill=32)),
        VE,
        r"prompt_ids must be token ids in \[0, vocab_size=32\)",
    ),
    (
        "generate prompt negative",
        lambda t: generate(ids(1, 2, dtype=torch.int16, fill=-3)),
        VE,
        r"prompt_ids.*\[-3, -3\]",
    ),
    ("generate max_new_tokens -1", lambda t: generate(max_new_tokens=-1), VE, r"max_new_tokens"),
    (
        "generate max_new_tokens float",
        lambda t: generate(max_new_tokens=1.5),
        TE,
        r"max_new_tokens must be an int",
    ),
    (
        "generate max_new_tokens None",
        lambda t: generate(max_new_tokens=None),
        TE,
        r"max_new_tokens",
    ),
    (
        "generate past max_seq_len",
        lambda t: generate(max_new_tokens=14),
        VE,
        r"max_new_tokens=14 = 17 exceeds config\.max_seq_len=16",
    ),
    (
        "generate temperature negative",
        lambda t: generate(temperature=-0.5),
        VE,
        r"temperature must be a finite number in \[0",
    ),
    ("generate temperature nan", lambda t: generate(temperature=float("nan")), VE, r"temperature"),
    ("generate temperature inf", lambda t: generate(temperature=float("inf")), VE, r"temperature"),
    ("generate temperature str", lambda t: generate(temperature="1"), TE, r"temperature"),
    ("generate temperature None", lambda t: generate(temperature=None), TE, r"temperature"),
    ("generate top_k 0", lambda t: generate(top_k=0), VE, r"top_k must be None or an int >= 1"),
    ("generate top_k float", lambda t: generate(top_k=1.5), TE, r"top_k"),
    ("generate top_k bool", lambda t: generate(top_k=True), TE, r"top_k"),
    ("generate seed 2**64", lambda t: generate(seed=2**64), VE, r"seed must be None or an int in"),
    ("generate seed 2**63", lambda t: generate(seed=2**63), VE, r"seed"),
    ("generate seed negative", lambda t: generate(seed=-1), VE, r"seed"),
    ("generate seed float", lambda t: generate(seed=1.0), TE, r"seed"),
    ("generate seed str", lambda t: generate(seed="0"), TE, r"seed"),
    # ---- new_cache
    ("new_cache batch_size 0", lambda t: model().new_cache(0), VE, r"batch_size"),
    ("new_cache capacity 0", lambda t: model().new_cache(1, capacity=0), VE, r"capacity"),
    ("new_cache capacity float", lambda t: model().new_cache(1, capacity=2.0), TE, r"capacity"),
    ("new_cache window 0", lambda t: model().new_cache(1, window=0), VE, r"window"),
    # ---- save
    ("save path None", lambda t: model().save(None), TE, r"path must be a str or os\.PathLike"),
    ("save path int", lambda t: model().save(3), TE, r"path must be a str or os\.PathLike"),
    ("save path empty", lambda t: model().save(""), VE, r"path must name a checkpoint folder"),
    (
        "save path is a file",
        lambda t: model().save(saved(t) / "config.json"),
        VE,
        r"path .*config\.json.* is not a folder",
    ),
    (
        "save path with other files",
        lambda t: model().save(foreign_file(t / "run")),
        VE,
        r"path .*notes\.txt.*not part of a TinyLM checkpoint",
    ),
    (
        "save path inside a file",
        lambda t: model().save(saved(t) / "config.json" / "m"),
        VE,
        r"path .*config\.json.m.* lies inside a file",
    ),
    # ---- load
    ("load path None", lambda t: TinyLM.load(None), TE, r"path must be a str or os\.PathLike"),
    ("load path bytes", lambda t: TinyLM.load(b"ckpt"), TE, r"path must be a str"),
    ("load path empty", lambda t: TinyLM.load(""), VE, r"path must name a checkpoint folder"),
    (
        "load missing folder",
        lambda t: TinyLM.load(t / "nothing"),
        FNF,
        r"no TinyLM at .*config\.json is missing",
    ),
    (
        "load a file",
        lambda t: TinyLM.load(saved(t) / "config.json"),
        VE,
        r"path .* is a file; expected a checkpoint folder",
    ),
    (
        "load missing weights",
        lambda t: TinyLM.load(saved(t, lambda f: (f / "model.safetensors").unlink())),
        FNF,
        r"model\.safetensors is missing",
    ),
    (
        "load config missing key",
        lambda t: TinyLM.load(saved(t, edit_config(lambda d: d.pop("rope")))),
        VE,
        r"config\.json is missing TinyLMConfig fields \['rope'\]",
    ),
    (
        "load config unknown key",
        lambda t: TinyLM.load(saved(t, edit_config(lambda d: d.update(heads=2)))),
        VE,
        r"unknown TinyLMConfig fields \['heads'\]",
    ),
    (
        "load config wrong type",
        lambda t: TinyLM.load(saved(t, edit_config(lambda d: d.update(d_model="16")))),
        VE,
        r"config\.json is not a valid TinyLMConfig: config\.d_model",
    ),
    (
        "load config not JSON",
        lambda t: TinyLM.load(saved(t, lambda f: (f / "config.json").write_text("{oops"))),
        VE,
        r"config\.json is not valid JSON",
    ),
    (
        "load config a list",
        lambda t: TinyLM.load(saved(t, lambda f: (f / "config.json").write_text("[]"))),
        VE,
        r"config\.json must hold a JSON object",
    ),
    (
        "load truncated weights",
        lambda t: TinyLM.load(saved(t, truncate_weights)),
        VE,
        r"model\.safetensors is not a readable safetensors file",
    ),
    (
        "load weights of another save",
        lambda t: TinyLM.load(saved(t, weights_of_other_model)),
        VE,
        r"different saves: the config says rope=False \(weights: True\)",
    ),
    (
        "load weights with corrupt recorded config",
        lambda t: TinyLM.load(saved(t, corrupt_recorded_config)),
        VE,
        r"model\.safetensors has a corrupt 'relattn\.config' metadata entry",
    ),
    # ---- KVCache
    ("KVCache num_layers 0", lambda t: cache(num_layers=0), VE, r"num_layers must be an int >= 1"),
    ("KVCache num_layers float", lambda t: cache(num_layers=1.5), TE, r"num_layers"),
    ("KVCache batch_size -1", lambda t: cache(batch_size=-1), VE, r"batch_size"),
    ("KVCache batch_size str", lambda t: cache(batch_size="2"), TE, r"batch_size"),
    ("KVCache num_kv_heads 0", lambda t: cache(num_kv_heads=0), VE, r"num_kv_heads"),
    ("KVCache head_dim None", lambda t: cache(head_dim=None), TE, r"head_dim"),
    ("KVCache capacity 0", lambda t: cache(capacity=0), VE, r"capacity"),
    (
        "KVCache capacity None",
        lambda t: cache(capacity=None),
        VE,
        r"capacity.*None only with a window",
    ),
    ("KVCache capacity float", lambda t: cache(capacity=4.0), TE, r"capacity"),
    (
        "KVCache capacity huge",
        lambda t: cache(capacity=2**46),  # 4 PiB: past any address space, even overcommitted
        VE,
        r"capacity=70368744177664 .*GiB.*allocating it failed",
    ),
    ("KVCache capacity overflow", lambda t: cache(capacity=2**62), VE, r"capacity"),
    ("KVCache window 0", lambda t: cache(window=0), VE, r"window"),
    ("KVCache window str", lambda t: cache(window="4"), TE, r"window"),
    ("KVCache dtype int", lambda t: cache(dtype=torch.int64), VE, r"dtype must be a floating"),
    ("KVCache dtype str", lambda t: cache(dtype="float32"), TE, r"dtype must be a floating"),
    ("KVCache device unknown", lambda t: cache(device="bogus"), VE, r"device must be a device"),
    ("KVCache device float", lambda t: cache(device=3.5), TE, r"device must be a torch\.device"),
    (
        "KVCache layer out of range",
        lambda t: cache().layer(1),
        VE,
        r"index must be an int in \[0, 0\]",
    ),
    ("KVCache layer str", lambda t: cache().layer("0"), TE, r"index"),
    ("update k not a tensor", lambda t: update(k=[0.0]), TE, r"k \(the new keys\) must be a torch"),
    (
        "update k wrong shape",
        lambda t: update(k=torch.zeros(1, 1, 2, 4)),
        VE,
        r"k \(the new keys\) must have shape \(B, Hkv, n, D\) with \(B, Hkv, D\) = \(1, 1, 8\)",
    ),
    (
        "update v wrong dtype",
        lambda t: update(v=torch.zeros(1, 1, 2, 8, dtype=torch.float64)),
        TE,
        r"v \(the new values\) must have the cache's dtype torch\.float32",
    ),
    (
        "update v wrong device",
        lambda t: update(v=torch.zeros(1, 1, 2, 8, device="meta")),
        VE,
        r"v \(the new values\) must be on the cache's device",
    ),
    (
        "update k v lengths differ",
        lambda t: update(k=torch.zeros(1, 1, 3, 8)),
        VE,
        r"k and v must have the same shape",
    ),
    (
        "update overflow",
        lambda t: update(torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8)),
        VE,
        r"KVCache overflow in layer 0.*capacity=4",
    ),
    (
        "update doc_ids float",
        lambda t: update(doc_ids=torch.zeros(1, 2)),
        TE,
        r"doc_ids must be an integer tensor",
    ),
    ("update doc_ids list", lambda t: update(doc_ids=[[0, 0]]), TE, r"doc_ids must be a torch"),
    (
        "update doc_ids shape",
        lambda t: update(doc_ids=ids(1, 3)),
        VE,
        r"doc_ids with a cache must cover the new tokens only",
    ),
    (
        "update key_padding_mask int",
        lambda t: update(key_padding_mask=ids(1, 2)),
        TE,
        r"key_padding_mask must be a bool tensor",
    ),
]

if not torch.cuda.is_available():
    ROWS.append(
        (
            "KVCache device cuda without one",
            lambda t: cache(device="cuda"),
            VE,
            r"device must be a device this machine has",
        )
    )


def test_the_corpus_is_large_enough():
    assert len(ROWS) >= 130
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("call, error, match", [row[1:] for row in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(tmp_path, call, error, match):
    with pytest.raises(error, match=match) as info:
        call(tmp_path)
    assert type(info.value) is error  # not a subclass that happens to match (e.g. IndexError)
