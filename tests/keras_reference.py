"""An independent NumPy reference of the original TensorFlow/Keras patched U-Net (test helper).

Written from the authors' `unet.py` / `nn.py` (PatchDiffusion-TF), step for step and in NHWC,
without sharing any code with `patchdiff_core`:

- `build(config, source)` mirrors the original `UNet.__init__`: it creates every Keras layer's
  variables in the order Keras does (the order of `ema_weights.h5`), drawing them from `source`.
  The same walk either reads a file's weights (`_ReadSource`) or invents random ones and records
  the legacy-HDF5 grouping (`_RandomSource`), so the reader and the writer cannot drift apart.
- `forward(config, weights, x, t, y)` mirrors `UNet.call`: float64 arithmetic, except the two
  sinusoidal encodings, which are computed in float32 exactly as the original computes them.
- `write_random_h5(config, path, seed)` writes random non-zero weights in the layout of
  `Model.save_weights(...)` (legacy HDF5): root attribute `layer_names`, one group per top-level
  layer with attribute `weight_names` and one dataset per variable.

`config` is a dict in the fixtures' `config.json` format (extra keys are ignored).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

GN_GROUPS = 32
GN_EPS = 1e-3  # tensorflow-addons GroupNormalization default
HEAD_DIM = 64  # AttentionBlock(channels_per_head=64)


# ----------------------------------------------------------------------------------------------
# Config helpers (the arithmetic of the original constructor)


def _blocks(cfg: dict) -> list[int]:
    n = cfg["n_blocks"]
    if isinstance(n, int):
        return [n] * len(cfg["c_mult"])
    n = list(n)
    assert len(n) == len(cfg["c_mult"])
    return n


def _conditional(cfg: dict) -> bool:
    return cfg.get("num_classes", 0) > 1


def _gated(cfg: dict) -> bool:
    # original: self.se = (se and num_classes); label embeddings exist only when num_classes > 1
    return bool(cfg.get("se", False) and cfg.get("num_classes", 0))


# ----------------------------------------------------------------------------------------------
# Weight sources


class _ReadSource:
    """Hands out the file's arrays in order, checking each shape."""

    def __init__(self, arrays):
        self.arrays = [np.asarray(a) for a in arrays]
        self.index = 0

    def top(self, kind: str) -> str:  # grouping is irrelevant when reading
        return kind

    def name(self, kind: str) -> str:
        return kind

    def var(self, owner: str, var: str, shape: tuple[int, ...]) -> np.ndarray:
        if self.index >= len(self.arrays):
            raise ValueError(f"weights run out at #{self.index} ({owner}/{var}, expected {shape})")
        a = self.arrays[self.index]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"weight #{self.index} ({owner}/{var}) has shape {a.shape}, expected {shape}")
        self.index += 1
        return a.astype(np.float64)

    def finish(self) -> None:
        if self.index != len(self.arrays):
            raise ValueError(f"{len(self.arrays) - self.index} weights left over after building the network")


class _RandomSource:
    """Invents non-zero weights and records them grouped by top-level layer, Keras-style names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.counts: dict[str, int] = defaultdict(int)
        self.groups: list[tuple[str, list[tuple[str, np.ndarray]]]] = []

    def _unique(self, kind: str) -> str:
        n = self.counts[kind]
        self.counts[kind] += 1
        return kind if n == 0 else f"{kind}_{n}"

    def top(self, kind: str) -> str:
        name = self._unique(kind)
        self.groups.append((name, []))
        return name

    def name(self, kind: str) -> str:
        return self._unique(kind)

    def var(self, owner: str, var: str, shape: tuple[int, ...]) -> np.ndarray:
        r = self.rng
        if var == "gamma":
            a = 1.0 + 0.2 * r.standard_normal(shape)
        elif var == "beta":
            a = 0.1 * r.standard_normal(shape)
        elif var == "embeddings":
            a = 0.5 * r.standard_normal(shape)
        else:  # kernel / bias
            a = 0.05 * r.standard_normal(shape)
        a = a.astype(np.float32)
        self.groups[-1][1].append((f"{owner}/{var}:0", a))
        return a.astype(np.float64)

    def finish(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Network construction: the original __init__, creation order = Keras weight order


def _dense(src, cin: int, units: int, name: str | None = None) -> dict:
    n = name or src.name("dense")
    return {"kernel": src.var(n, "kernel", (cin, units)), "bias": src.var(n, "bias", (units,))}


def _conv(src, cin: int, filters: int, name: str | None = None) -> dict:
    n = name or src.name("conv2d")
    return {"kernel": src.var(n, "kernel", (3, 3, cin, filters)), "bias": src.var(n, "bias", (filters,))}


def _gn(src, channels: int) -> dict:
    n = src.name("group_normalization")
    return {"gamma": src.var(n, "gamma", (channels,)), "beta": src.var(n, "beta", (channels,))}


def _resblock(src, cin: int, c: int, temb_dim: int, se: bool, cemb_dim: int, shortcut: bool) -> dict:
    # resblock / resblock_se __init__: in_layers (GN, swish, conv), [classemb_proj], emb/temb proj,
    # out_norm (no variables), out_layers (swish, conv), [skip_connection Dense]
    p = {"kind": "res", "se": se, "shortcut": shortcut}
    p["in_norm"] = _gn(src, cin)
    p["in_conv"] = _conv(src, cin, c)
    if se:
        p["classemb_proj"] = _dense(src, cemb_dim, c)
    p["temb_proj"] = _dense(src, temb_dim, 2 * c)
    p["out_conv"] = _conv(src, c, c)
    if shortcut:
        p["skip"] = _dense(src, cin, c)
    if not shortcut and cin != c:
        raise ValueError(f"residual block without shortcut gets {cin} channels but outputs {c}")
    return p


def _attention(src, c: int) -> dict:
    if c % HEAD_DIM:
        raise ValueError(f"attention on {c} channels: not a multiple of {HEAD_DIM}")
    return {"kind": "attn", "c": c, "norm": _gn(src, c), "qkv": _dense(src, c, 3 * c), "out": _dense(src, c, c)}


def build(cfg: dict, src) -> dict:
    c = cfg["c"]
    c_mult = cfg["c_mult"]
    blocks = _blocks(cfg)
    num_classes = cfg.get("num_classes", 0)
    se = _gated(cfg)
    p = cfg.get("patch_size", 1)
    resolution = cfg["res"] // p
    c_out = 3 * p * p
    temb_dim = int(c * c_mult[-1])
    attn_resos = cfg["attn_resos"]
    net: dict = {}

    if num_classes > 1:
        n = src.top("embedding")  # a top-level layer's group is named like the layer itself
        width = c if se else int(c * c_mult[-1])
        net["label_embs"] = src.var(n, "embeddings", (num_classes + 1, width))
    src.top("sequential")
    net["temb"] = [_dense(src, c, 4 * c), _dense(src, 4 * c, temb_dim)]
    net["in_proj"] = _conv(src, c_out, c, name=src.top("conv2d"))

    # input layers; `widths` tracks the channel count of each stored activation (the skips)
    current_reso = resolution
    ch = c
    widths = [ch]
    net["input"] = []
    for level, mult in enumerate(c_mult):
        C = int(c * mult)
        for _ in range(blocks[level]):
            src.top("timestep_embed_sequential")
            layers = [_resblock(src, ch, C, temb_dim, se, c, shortcut=False)]
            ch = C
            if current_reso in attn_resos:
                layers.append(_attention(src, C))
            net["input"].append(layers)
            widths.append(ch)
        if level != len(c_mult) - 1:
            src.top("downsample")
            C_next = int(c * c_mult[level + 1])
            net["input"].append([{"kind": "down", "conv": _conv(src, ch, C_next)}])
            ch = C_next
            current_reso /= 2
            widths.append(ch)

    C = int(c * c_mult[-1])
    net["middle"] = []
    src.top("resblock_se" if se else "resblock")
    net["middle"].append(_resblock(src, ch, C, temb_dim, se, c, shortcut=False))
    src.top("attention_block")
    net["middle"].append(_attention(src, C))
    src.top("resblock_se" if se else "resblock")
    net["middle"].append(_resblock(src, C, C, temb_dim, se, c, shortcut=False))
    ch = C

    net["output"] = []
    for level, mult in list(enumerate(c_mult))[::-1]:
        C = int(c * mult)
        for i in range(blocks[level] + 1):
            src.top("timestep_embed_sequential")
            cin = ch + widths.pop()
            layers = [_resblock(src, cin, C, temb_dim, se, c, shortcut=True)]
            ch = C
            if current_reso in attn_resos:
                layers.append(_attention(src, C))
            if level and i == blocks[level]:
                C_prev = int(c * c_mult[level - 1])
                layers.append({"kind": "up", "conv": _conv(src, ch, C_prev)})
                ch = C_prev
                current_reso *= 2
            net["output"].append(layers)

    src.top("sequential")
    net["out_proj"] = {"norm": _gn(src, ch), "conv": _conv(src, ch, c_out)}
    net["var_temb"] = _dense(src, temb_dim, 2 * c, name=src.top("dense"))
    src.top("sequential")
    net["var_model"] = [_conv(src, c + ch, c), _conv(src, c, c_out)]
    src.finish()
    return net


# ----------------------------------------------------------------------------------------------
# Primitive ops (NHWC, float64)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _swish(x):
    return x * _sigmoid(x)


def _apply_dense(x, d):
    return x @ d["kernel"] + d["bias"]


def _group_norm(x, gamma=None, beta=None, groups=GN_GROUPS, eps=GN_EPS):
    """tfa GroupNormalization on channels-last input of any rank >= 3."""
    shape = x.shape
    C = shape[-1]
    g = x.reshape(shape[0], -1, groups, C // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    out = g.reshape(shape)
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "SAME": total padding split with the extra row/column at the end."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _conv2d(x, d, stride: int = 1):
    kernel, bias = d["kernel"], d["bias"]
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = _same_pads(x.shape[1], kh, stride), _same_pads(x.shape[2], kw, stride)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))  # [B, Ho, Wo, Cin, kh, kw]
    win = win[:, ::stride, ::stride]
    return np.tensordot(win, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2])) + bias


def _nearest_up2(x):
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def timestep_encoding(t, dim: int) -> np.ndarray:
    """get_timestep_encoding, computed in float32 as the original does."""
    half = dim // 2
    step = np.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step))
    args = np.asarray(t).astype(np.float32)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


def positional_encoding_2d(resolution: int, dim: int) -> np.ndarray:
    """get_2d_positional_encoding, float32 as in the original: [1, R, R, dim]."""
    omega = np.float32(64 / resolution)
    half = dim // 2
    arange = np.arange(resolution, dtype=np.float32)
    step = np.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step))
    emb = np.sin((arange[:, None] * freqs[None, :]) * omega)  # [R, half]
    emb_x = np.repeat(emb[None, ...], resolution, axis=0)  # [R, R, half]: varies along axis 1
    emb_y = np.repeat(emb[:, None, :], resolution, axis=1)  # [R, R, half]: varies along axis 0
    return np.concatenate([emb_x, emb_y], axis=-1)[None]


def to_patches(x, p: int):
    """tf.image.extract_patches(x, [1,p,p,1], [1,p,p,1], [1,1,1,1], "SAME") for divisible sizes:
    out[b, i, j, (r*p + s)*C + ch] = x[b, i*p + r, j*p + s, ch]."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H // p, W // p, p * p * C)


def from_patches(x, p: int):
    """UNet.from_patches, the same transposes and reshapes."""
    B, H, W, C = x.shape
    x = np.transpose(x, [0, 2, 1, 3])
    x = np.reshape(x, [B, W, H * p, C // p])
    x = np.transpose(x, [0, 2, 1, 3])
    B, H, W, C = x.shape
    return np.reshape(x, [B, H, W * p, C // p])


# ----------------------------------------------------------------------------------------------
# Forward: the original call()


def _call_resblock(blk, x, conditioning):
    if blk["se"]:
        c_emb, t_emb = conditioning
        scale, shift = np.split(_apply_dense(t_emb, blk["temb_proj"]), 2, axis=-1)
        h = _conv2d(_swish(_group_norm(x, blk["in_norm"]["gamma"], blk["in_norm"]["beta"])), blk["in_conv"])
        h = _group_norm(h) * (1 + scale) + shift
        h = _conv2d(_swish(h), blk["out_conv"]) * _sigmoid(_apply_dense(c_emb, blk["classemb_proj"]) + 2.0)
    else:
        h = _conv2d(_swish(_group_norm(x, blk["in_norm"]["gamma"], blk["in_norm"]["beta"])), blk["in_conv"])
        scale, shift = np.split(_apply_dense(conditioning, blk["temb_proj"]), 2, axis=-1)
        h = _group_norm(h) * (1 + scale) + shift
        h = _conv2d(_swish(h), blk["out_conv"])
    if blk["shortcut"]:
        return _apply_dense(x, blk["skip"]) + h
    return x + h


def _call_attention(blk, x):
    B, H, W, C = x.shape
    heads = C // HEAD_DIM
    factor = 1 / np.sqrt(np.sqrt(HEAD_DIM)).astype("float32")
    x = x.reshape(B, H * W, C)
    qkv = _apply_dense(_group_norm(x, blk["norm"]["gamma"], blk["norm"]["beta"]), blk["qkv"])
    q, k, v = np.split(qkv, 3, axis=-1)

    def split_heads(a):
        return a.reshape(B, H * W, heads, HEAD_DIM).transpose(0, 2, 1, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    qk = (q * factor) @ (k * factor).transpose(0, 1, 3, 2)
    out = _softmax(qk, axis=-1) @ v
    out = out.transpose(0, 2, 1, 3).reshape(B, -1, C)
    h = _apply_dense(out, blk["out"])
    return (x + h).reshape(B, H, W, C)


def _call_layer(blk, x, conditioning):
    kind = blk["kind"]
    if kind == "res":
        return _call_resblock(blk, x, conditioning)
    if kind == "attn":
        return _call_attention(blk, x)
    if kind == "down":
        return _conv2d(x, blk["conv"], stride=2)
    if kind == "up":
        return _conv2d(_nearest_up2(x), blk["conv"])
    raise AssertionError(kind)


def forward(cfg: dict, weights, x, t, y=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var), NHWC float64, for x [B,R,R,3] NHWC, t [B] ints, y [B] ints (ignored if unconditional).

    `weights` is the flat list of arrays in file order (see `read_h5_arrays`) or an already built
    network from `build`.
    """
    net = weights if isinstance(weights, dict) else build(cfg, _ReadSource(weights))
    c = cfg["c"]
    p = cfg.get("patch_size", 1)
    resolution = cfg["res"] // p

    t_emb = timestep_encoding(t, c).astype(np.float64)
    t_emb = _swish(_apply_dense(t_emb, net["temb"][0]))
    t_emb = _swish(_apply_dense(t_emb, net["temb"][1]))
    t_emb = t_emb[:, None, None, :]
    if cfg.get("num_classes", 0) > 1:
        c_emb = net["label_embs"][np.asarray(y)][:, None, None, :]
        conditioning = (c_emb, t_emb) if _gated(cfg) else c_emb + t_emb
    else:
        conditioning = t_emb

    x = to_patches(np.asarray(x, dtype=np.float64), p)
    x = _conv2d(x, net["in_proj"])
    x = x + positional_encoding_2d(resolution, c).astype(np.float64)
    h = x
    activations = [h]
    for layers in net["input"]:
        for blk in layers:
            h = _call_layer(blk, h, conditioning)
        activations.append(h)
    for blk in net["middle"]:
        h = _call_layer(blk, h, conditioning)
    for layers in net["output"]:
        h = np.concatenate([h, activations.pop()], axis=-1)
        for blk in layers:
            h = _call_layer(blk, h, conditioning)

    op = net["out_proj"]
    mean = _conv2d(_swish(_group_norm(h, op["norm"]["gamma"], op["norm"]["beta"])), op["conv"])
    mean = from_patches(mean, p)

    # call_var_network: concat(stem output, h) + Dense(2c)(swish(t_emb)) -- the time embedding only
    concat = np.concatenate([x, h], axis=-1) + _apply_dense(_swish(t_emb), net["var_temb"])
    v = _swish(_conv2d(concat, net["var_model"][0]))
    v = _sigmoid(_conv2d(v, net["var_model"][1]))
    return mean, from_patches(v, p)


# ----------------------------------------------------------------------------------------------
# Legacy Keras HDF5 I/O (independent of patchdiff_core.model.keras_h5)


def _str(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def read_h5_groups(path) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """[(layer name, [(weight name, array), ...]), ...] in the file's order."""
    import h5py

    with h5py.File(path, "r") as f:
        out = []
        for layer in f.attrs["layer_names"]:
            g = f[_str(layer)]
            out.append((_str(layer), [(_str(n), np.asarray(g[_str(n)])) for n in g.attrs["weight_names"]]))
        return out


def read_h5_arrays(path) -> list[np.ndarray]:
    return [a for _, ws in read_h5_groups(path) for _, a in ws]


def random_groups(cfg: dict, seed: int) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    src = _RandomSource(seed)
    build(cfg, src)
    return src.groups


def write_groups_h5(groups, path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["layer_names"] = np.array([name.encode("utf8") for name, _ in groups])
        for name, weights in groups:
            g = f.create_group(name)
            g.attrs["weight_names"] = np.array([w.encode("utf8") for w, _ in weights])
            for w, a in weights:
                g.create_dataset(w, data=a)


def write_random_h5(cfg: dict, path, seed: int = 0) -> list[np.ndarray]:
    """Random weights for `cfg` saved at `path` in legacy Keras layout; returns them in file order."""
    groups = random_groups(cfg, seed)
    write_groups_h5(groups, path)
    return [a for _, ws in groups for _, a in ws]


def layer_kind(name: str) -> str:
    """'timestep_embed_sequential_12' -> 'timestep_embed_sequential'."""
    return re.sub(r"_\d+$", "", name)


__all__ = [
    "build",
    "forward",
    "read_h5_arrays",
    "read_h5_groups",
    "random_groups",
    "write_groups_h5",
    "write_random_h5",
    "layer_kind",
]
