"""Frame-causal VGGT aggregator: one batched pass or frame-by-frame streaming, same function.

The module reproduces VGGT-1B's aggregator as JanusVLN runs it: a DINOv2 ViT-L/14 (4 registers)
turns each frame into patch tokens; a camera token and 4 register tokens (one slot for the first
frame, one for all later frames) are prepended; then ``depth`` layers alternate a frame-attention
block (within one frame) and a global-attention block. Global attention is frame-causal: frame k
sees frames 0..k. JanusVLN gets that by streaming frames with a KV cache; here the same math also
runs as one batched pass with block-causal attention. Parameter names equal the reference's, so
an official ``aggregator.*`` state dict loads strictly.

Layer ``i`` outputs ``cat(frame_block_i(x), global_block_i(x))``. Only layers up to the requested
one are computed (the cached feature is layer ``depth - 2``, so the last layer never runs), and
when only the last frame is wanted the requested layer's global block runs for that frame only.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from janus_job.errors import JobError
from janus_job.io import fetch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CausalImpl = Literal["chunked", "mask"]


@dataclass(frozen=True)
class VGGTAggregatorConfig:
    """Architecture of the aggregator; the defaults are VGGT-1B's."""

    img_size: int = 518  # DINOv2 position-embedding grid is img_size // patch_size square
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global block pairs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    qk_norm: bool = True
    init_values: float = 0.01  # LayerScale of the frame/global blocks
    patch_embed_depth: int = 24  # DINOv2 blocks
    patch_embed_heads: int = 16
    patch_embed_mlp_ratio: float = 4.0
    patch_embed_init_values: float = 1.0

    @classmethod
    def tiny(cls) -> "VGGTAggregatorConfig":
        """A few-thousand-parameter variant for CPU tests (same code paths)."""
        return cls(img_size=56, embed_dim=32, depth=3, num_heads=2, patch_embed_depth=2,
                   patch_embed_heads=2)

    @property
    def patch_start_idx(self) -> int:
        return 1 + self.num_register_tokens

    @property
    def feature_layer(self) -> int:
        """The layer JanusVLN takes its spatial feature from (``aggregated_tokens[-2]``)."""
        return self.depth - 2

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        head_dim, rem = divmod(self.embed_dim, self.num_heads)
        if rem or head_dim % 4:
            raise JobError(f"vggt config: embed_dim {self.embed_dim} / num_heads {self.num_heads} "
                           "must give a head dim divisible by 4 (2D RoPE)")
        if self.embed_dim % self.patch_embed_heads:
            raise JobError("vggt config: embed_dim must be divisible by patch_embed_heads")
        if self.depth < 2:
            raise JobError(f"vggt config: depth {self.depth} < 2 has no second-to-last layer")


# --------------------------------------------------------------------------- building blocks


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Projections of a multi-head self-attention; the attention itself is done by the caller."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` -> q, k, v as ``(B, N, heads, head_dim)``, q/k normalised."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        return self.q_norm(q), self.k_norm(k), v


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (names match DINOv2/VGGT)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float,
                 qk_norm: bool, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual update from the attention output ``(B, N, C)``, then the MLP half."""
        x = x + self.ls1(self.attn.proj(attended))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, rope: "RopeTable | None" = None) -> torch.Tensor:
        q, k, v = self.attn.project(self.norm1(x))
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        out = attention(q, k, v)
        return self.finish(x, out.reshape(x.shape))


class PatchConv(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoPatchEmbed(nn.Module):
    """DINOv2 ViT with registers used as the patch embedding; returns normalised patch tokens."""

    def __init__(self, cfg: VGGTAggregatorConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchConv(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # unused
        self.blocks = nn.ModuleList(
            Block(dim, cfg.patch_embed_heads, cfg.patch_embed_mlp_ratio,
                  cfg.patch_embed_init_values, qk_norm=False, norm_eps=1e-6)
            for _ in range(cfg.patch_embed_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """``(1, 1 + rows*cols, C)`` in float32: bicubic, antialiased resize of the square grid."""
        table = self.pos_embed.float()
        n = table.shape[1] - 1
        side = math.isqrt(n)
        if rows * cols == n and rows == cols:
            return table
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, Hp*Wp, C)`` patch tokens."""
        n, _, height, width = images.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(n, -1, -1)
        dtype = torch.promote_types(patches.dtype, cls.dtype)
        pos = self.position_embedding(rows, cols).to(dtype)
        x = torch.cat([cls + pos[:, :1], self.register_tokens.expand(n, -1, -1),
                       patches + pos[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens:]


# --------------------------------------------------------------------------- attention helpers


class RopeTable:
    """2D rotary embedding for one frame's tokens (special tokens at (0, 0), patches at (y+1, x+1)).

    ``cos``/``sin`` are ``(P, 1, head_dim)`` float32: the first half of a head rotates with the row
    index, the second half with the column index, each half split into two rotated quarters.
    """

    def __init__(self, rows: int, cols: int, specials: int, head_dim: int, base: float,
                 device: torch.device) -> None:
        half = head_dim // 2
        exponents = torch.arange(0, half, 2, device=device).float() / half
        inv_freq = 1.0 / (base ** exponents)
        ys = torch.arange(rows, device=device).repeat_interleave(cols) + 1
        xs = torch.arange(cols, device=device).repeat(rows) + 1
        zeros = torch.zeros(specials, dtype=ys.dtype, device=device)
        ys, xs = torch.cat([zeros, ys]), torch.cat([zeros, xs])
        positions = torch.arange(max(rows, cols) + 1, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        self.cos = torch.cat([cos[ys], cos[xs]], dim=-1).unsqueeze(1)
        self.sin = torch.cat([sin[ys], sin[xs]], dim=-1).unsqueeze(1)
        self.tokens = ys.numel()

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate ``(..., P, heads, head_dim)`` (``(B, S*P, h, d)`` is viewed per frame)."""
        shape = t.shape
        frames = t.reshape(-1, self.tokens, *shape[-2:])
        x = frames.float()
        q1, q2, q3, q4 = x.chunk(4, dim=-1)
        rotated = torch.cat([-q2, q1, -q4, q3], dim=-1)
        out = x * self.cos + rotated * self.sin
        return out.to(t.dtype).reshape(shape)


def _attention_dtype(t: torch.Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on ``(B, N, h, d)`` inputs; returns ``(B, Nq, h, d)``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class GlobalKVCache:
    """Global-attention keys/values of the frames seen so far, per layer (post-norm, post-RoPE)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.num_frames = 0
        self.tokens_per_frame: int | None = None
        self.batch: int | None = None

    def commit(self, batch: int, tokens: int, frames: int) -> None:
        self.batch, self.tokens_per_frame = batch, tokens
        self.num_frames += frames

    def check(self, batch: int, tokens: int, layers: int) -> None:
        if self.num_frames == 0:
            return
        if (batch, tokens) != (self.batch, self.tokens_per_frame) or layers != len(self.keys):
            raise JobError(
                f"vggt streaming: frame of batch {batch} / {tokens} tokens / {layers} layers does "
                f"not match the cache ({self.batch} / {self.tokens_per_frame} / "
                f"{len(self.keys)}); start a new cache for a new sample or geometry"
            )


# --------------------------------------------------------------------------- the aggregator


class FrameCausalAggregator(nn.Module):
    """VGGT aggregator with frame-causal global attention (see the module docstring)."""

    def __init__(self, config: VGGTAggregatorConfig | None = None,
                 causal_impl: CausalImpl = "chunked") -> None:
        super().__init__()
        cfg = config or VGGTAggregatorConfig()
        cfg.validate()
        self.config = cfg
        self.causal_impl = causal_impl
        self.patch_embed = DinoPatchEmbed(cfg)

        def make_blocks() -> nn.ModuleList:
            return nn.ModuleList(
                Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.init_values,
                      qk_norm=cfg.qk_norm, norm_eps=1e-5)
                for _ in range(cfg.depth)
            )

        self.frame_blocks = make_blocks()
        self.global_blocks = make_blocks()
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, cfg.embed_dim) * 1e-6)
        self.register_token = nn.Parameter(
            torch.randn(1, 2, cfg.num_register_tokens, cfg.embed_dim) * 1e-6)
        self._rope: dict[tuple, RopeTable] = {}

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def patch_start_idx(self) -> int:
        return self.config.patch_start_idx

    def new_cache(self) -> GlobalKVCache:
        return GlobalKVCache()

    def _rope_table(self, rows: int, cols: int, device: torch.device) -> RopeTable:
        key = (rows, cols, str(device))
        if key not in self._rope:
            self._rope[key] = RopeTable(rows, cols, self.patch_start_idx,
                                        self.config.embed_dim // self.config.num_heads,
                                        self.config.rope_freq, device)
        return self._rope[key]

    def _embed(self, images: torch.Tensor, first_frame: int) -> torch.Tensor:
        """``(B, S, 3, H, W)`` in [0, 1] -> ``(B*S, P, C)`` tokens with camera/register tokens."""
        b, s, _, height, width = images.shape
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 1, 3, 1, 1)
        normed = ((images.float() - mean) / std).reshape(b * s, 3, height, width)
        normed = normed.to(self.patch_embed.patch_embed.proj.weight.dtype)
        patches = self.patch_embed(normed)
        slots = torch.tensor([0 if first_frame + j == 0 else 1 for j in range(s)],
                             device=images.device)
        camera = self.camera_token[0, slots]  # (S, 1, C)
        registers = self.register_token[0, slots]  # (S, R, C)
        specials = torch.cat([camera, registers], dim=1)
        specials = specials.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * s, -1, specials.shape[-1])
        return torch.cat([specials, patches], dim=1)

    def forward(self, images: torch.Tensor, cache: GlobalKVCache | None = None,
                layer: int | None = None, frames: Literal["last", "all"] = "all") -> torch.Tensor:
        """Run frames ``(B, S, 3, H, W)`` (values in [0, 1]) after those already in ``cache``.

        Returns layer ``layer``'s output (default: the feature layer, ``depth - 2``) as
        ``(B, S or 1, P, 2C)``: frame-block half then global-block half, camera and register
        tokens first. With ``cache``, the frames are appended to it (streaming); without, the
        S frames form one frame-causal sequence (batched).
        """
        cfg = self.config
        if images.dim() != 5 or images.shape[2] != 3:
            raise JobError(f"vggt: expected frames (B, S, 3, H, W), got {tuple(images.shape)}")
        b, s, _, height, width = images.shape
        p = cfg.patch_size
        if s == 0 or height % p or width % p or height < p or width < p:
            raise JobError(f"vggt: {s} frames of {height}x{width}; need >= 1 frame and H, W "
                           f"positive multiples of {p} (use frames.preprocess_for_vggt)")
        if frames not in ("last", "all"):
            raise JobError(f"vggt: frames must be 'last' or 'all', got {frames!r}")
        layer = cfg.feature_layer if layer is None else layer
        if not 0 <= layer < cfg.depth:
            raise JobError(f"vggt: layer {layer} outside 0..{cfg.depth - 1}")
        rows, cols = height // p, width // p
        tokens = rows * cols + self.patch_start_idx
        first = 0
        if cache is not None:
            cache.check(b, tokens, layer + 1)
            first = cache.num_frames
        rope = self._rope_table(rows, cols, images.device)

        x = self._embed(images, first)  # (B*S, P, C)
        for i in range(layer + 1):
            x = self.frame_blocks[i](x, rope)
            frame_out = x.view(b, s, tokens, -1)
            only_last = i == layer and frames == "last"
            x = self._global_block(i, frame_out, rope, cache, only_last)
            if i == layer:
                break
            x = x.reshape(b * s, tokens, -1)
        if cache is not None:
            cache.commit(b, tokens, s)
        if frames == "last":
            frame_out = frame_out[:, -1:]
        return torch.cat([frame_out, x], dim=-1)

    def _global_block(self, i: int, x: torch.Tensor, rope: RopeTable,
                      cache: GlobalKVCache | None, only_last: bool) -> torch.Tensor:
        """Frame-causal global attention of ``x`` ``(B, S, P, C)`` -> ``(B, S or 1, P, C)``."""
        block = self.global_blocks[i]
        b, s, tokens, dim = x.shape
        flat = x.reshape(b, s * tokens, dim)
        q, k, v = block.attn.project(block.norm1(flat))
        k = rope.apply(k)
        query_from = s - 1 if only_last else 0
        q = rope.apply(q[:, query_from * tokens:])
        dtype = _attention_dtype(v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        past = 0
        if cache is not None:
            past = cache.num_frames
            if past:
                k = torch.cat([cache.keys[i], k], dim=1)
                v = torch.cat([cache.values[i], v], dim=1)
                cache.keys[i], cache.values[i] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        out = self._causal_attention(q, k, v, past + query_from, tokens)
        residual = x[:, query_from:].reshape(b, -1, dim)
        out = block.finish(residual, out.reshape(b, -1, dim))
        return out.view(b, s - query_from, tokens, dim)

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          first_query_frame: int, tokens: int) -> torch.Tensor:
        """Queries of frames ``first_query_frame..`` attend keys of frames ``0..own`` frame."""
        n_query = q.shape[1] // tokens
        n_key = k.shape[1] // tokens
        if n_query == 1 and first_query_frame == n_key - 1:
            return attention(q, k, v)
        if self.causal_impl == "mask":
            q_frame = torch.arange(n_query, device=q.device).repeat_interleave(tokens)
            k_frame = torch.arange(n_key, device=q.device).repeat_interleave(tokens)
            allowed = (q_frame[:, None] + first_query_frame) >= k_frame[None, :]
            return attention(q, k, v, mask=allowed)
        outs = []
        for j in range(n_query):
            end = (first_query_frame + j + 1) * tokens
            outs.append(attention(q[:, j * tokens:(j + 1) * tokens], k[:, :end], v[:, :end]))
        return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------- the cached feature


def spatial_features(aggregator: FrameCausalAggregator, frames: torch.Tensor,
                     mode: Literal["batched", "streaming"] = "batched") -> torch.Tensor:
    """JanusVLN's spatial feature of each sample: ``(B, Hp', Wp', 2C)``.

    ``frames`` is ``(B, S, 3, H, W)`` (or ``(S, 3, H, W)`` for one sample), preprocessed frames
    in [0, 1]. The value is the last frame's output of layer ``depth - 2``, patch tokens only,
    on the patch grid cropped to even rows and columns (35x46 -> 34x46). Runs under no_grad in
    the caller's autocast / dtype.
    """
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    if frames.dim() != 5:
        raise JobError(f"spatial_features: expected (B, S, 3, H, W) frames, got {tuple(frames.shape)}")
    if mode not in ("batched", "streaming"):
        raise JobError(f"spatial_features: mode must be 'batched' or 'streaming', got {mode!r}")
    b, s, _, height, width = frames.shape
    cfg = aggregator.config
    rows, cols = height // cfg.patch_size, width // cfg.patch_size
    with torch.no_grad():
        if mode == "batched":
            out = aggregator(frames, frames="last")
        else:
            cache = aggregator.new_cache()
            for j in range(s):
                out = aggregator(frames[:, j:j + 1], cache=cache, frames="last")
    patches = out[:, -1, cfg.patch_start_idx:].reshape(b, rows, cols, -1)
    return patches[:, : rows // 2 * 2, : cols // 2 * 2]


# --------------------------------------------------------------------------- checkpoints
# A checkpoint describes its own architecture: the safetensors metadata holds the aggregator config
# as JSON under ARCHITECTURE_KEY (what `save_aggregator` writes), or a config.json beside the file
# holds its fields (as the official VGGT-1B repository ships one). A checkpoint without either is
# read as VGGT-1B, and refused unless its tensors have VGGT-1B's names and shapes.

CHECKPOINT_PREFIX = "aggregator."
ARCHITECTURE_KEY = "janus.vggt.aggregator"
CONFIG_FILE = "config.json"


def save_aggregator(aggregator: FrameCausalAggregator, path: str | os.PathLike) -> None:
    """Writes ``aggregator`` as a VGGT checkpoint (``aggregator.*`` tensors) that describes itself.

    Atomic: a temporary file beside ``path`` is renamed into place.
    """
    import json

    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {CHECKPOINT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in aggregator.state_dict().items()}
    metadata = {"format": "pt", ARCHITECTURE_KEY: json.dumps(aggregator.config.to_dict(), sort_keys=True)}
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def _config_from(fields: object, where: str) -> VGGTAggregatorConfig:
    known = {f for f in VGGTAggregatorConfig.__dataclass_fields__}
    if not isinstance(fields, dict):
        raise JobError(f"{where}: the VGGT architecture must be a JSON object of {', '.join(sorted(known))}")
    try:
        config = VGGTAggregatorConfig(**{k: v for k, v in fields.items() if k in known})
    except TypeError as err:
        raise JobError(f"{where}: not a VGGT aggregator architecture ({err})") from err
    config.validate()
    return config


def _safetensors_metadata(path: str, endpoint_url: str | None) -> dict:
    """The metadata of a safetensors file, reading only its header (local or remote)."""
    import json
    import struct

    from janus_job.io import url_to_fs

    fs, inner = url_to_fs(path, endpoint_url)
    try:
        with fs.open(inner, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100 << 20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(handle.read(size))
    except FileNotFoundError:
        raise JobError(f"vggt checkpoint {path} does not exist; point model.vggt at a VGGT checkpoint") from None
    except (OSError, ValueError, struct.error) as err:
        raise JobError(f"vggt checkpoint {path} is not a readable safetensors file ({err}); "
                       "re-download model.safetensors") from err
    return header.get("__metadata__") or {}


def describe_checkpoint(path_or_url: str, endpoint_url: str | None = None) -> VGGTAggregatorConfig | None:
    """The architecture a VGGT checkpoint describes (its safetensors metadata, else a config.json
    beside it), or None when it describes none. Reads no tensors."""
    import json

    from janus_job.io import read_bytes

    path = str(path_or_url)
    if path.endswith(".safetensors"):
        described = _safetensors_metadata(path, endpoint_url).get(ARCHITECTURE_KEY)
        if described is not None:
            try:
                fields = json.loads(described)
            except ValueError as err:
                raise JobError(f"vggt checkpoint {path}: metadata {ARCHITECTURE_KEY} is not JSON ({err})") from err
            return _config_from(fields, f"vggt checkpoint {path} (metadata {ARCHITECTURE_KEY})")
    beside = path.rsplit("/", 1)[0] + "/" + CONFIG_FILE if "/" in path else CONFIG_FILE
    try:
        raw = read_bytes(beside, endpoint_url)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise JobError(f"cannot read {beside} beside the vggt checkpoint: {err}") from err
    try:
        fields = json.loads(raw)
    except ValueError as err:
        raise JobError(f"{beside} beside the vggt checkpoint is not JSON ({err})") from err
    return _config_from(fields, str(beside))


def _read_state_dict(local_path: str) -> dict[str, torch.Tensor]:
    """Tensors under ``aggregator.`` of a VGGT checkpoint (other heads are never loaded)."""
    if local_path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(local_path, framework="pt", device="cpu") as f:
                names = [n for n in f.keys() if n.startswith(CHECKPOINT_PREFIX)]
                return {n[len(CHECKPOINT_PREFIX):]: f.get_tensor(n) for n in names}
        except (SafetensorError, OSError) as err:
            raise JobError(f"vggt checkpoint {local_path} is not a readable safetensors file "
                           f"({err}); re-download model.safetensors") from err
    try:
        state = torch.load(local_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises a zoo of types for a bad pickle / zip
        raise JobError(f"vggt checkpoint {local_path} is not a readable torch file ({err}); "
                       "re-download model.pt or use model.safetensors") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JobError(f"vggt checkpoint {local_path} is not a flat state dict of tensors")
    return {n[len(CHECKPOINT_PREFIX):]: t for n, t in state.items()
            if n.startswith(CHECKPOINT_PREFIX)}


def load_aggregator(path_or_url: str, config: VGGTAggregatorConfig | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    causal_impl: CausalImpl = "chunked", endpoint_url: str | None = None) -> FrameCausalAggregator:
    """Load the aggregator of a VGGT checkpoint (``model.safetensors`` / ``model.pt``).

    The architecture is ``config`` when given, else the one the checkpoint describes
    (`describe_checkpoint`), else VGGT-1B. ``path_or_url`` is a local path or any fsspec URL
    (``s3://``, ``https://``, ...); remote files are copied to a temporary file first
    (``endpoint_url`` for s3://, see janus_job.io). Keys outside ``aggregator.*`` are ignored; a
    missing, unexpected or wrongly shaped aggregator key is a JobError.
    """
    described = None if config is not None else describe_checkpoint(str(path_or_url), endpoint_url)
    cfg = config or described or VGGTAggregatorConfig()
    path = str(path_or_url)
    suffix = ".safetensors" if path.endswith(".safetensors") else ".pt"
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        with tempfile.TemporaryDirectory(prefix="vggt-ckpt-") as tmp:
            local = os.path.join(tmp, "checkpoint" + suffix)
            fetch_file(path, local, endpoint_url, what="vggt checkpoint")
            state = _read_state_dict(local)
            state = {n: t.clone() for n, t in state.items()}  # detach from the temp file's mmap
    else:
        if not os.path.isfile(path):
            raise JobError(f"vggt checkpoint {path} does not exist; point vggt weights at "
                           "VGGT-1B's model.safetensors or model.pt")
        state = _read_state_dict(path)
    if not state:
        raise JobError(f"vggt checkpoint {path_or_url} has no 'aggregator.*' tensors; is it a "
                       "VGGT checkpoint (facebook/VGGT-1B model.safetensors)?")

    with torch.device("meta"):
        model = FrameCausalAggregator(cfg, causal_impl=causal_impl)
    expected = {n: t.shape for n, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != tuple(expected[n]))
    if missing or unexpected or wrong:
        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing aggregator.{{{show(missing)}}}")
        if unexpected:
            problems.append(f"unexpected aggregator.{{{show(unexpected)}}}")
        if wrong:
            problems.append("wrong shape for " + show(
                [f"{n} {tuple(state[n].shape)} != {tuple(expected[n])}" for n in wrong]))
        if config is None and described is None:
            fix = ("it describes no architecture, so it was read as VGGT-1B: use VGGT-1B's checkpoint, or write "
                   f"yours with janus_job.models.vggt.save_aggregator, or put a {CONFIG_FILE} with its architecture "
                   "beside it")
        else:
            fix = "use a checkpoint of this architecture"
        raise JobError(f"vggt checkpoint {path_or_url} does not match the aggregator architecture: "
                       + "; ".join(problems) + f"; {fix}")
    model.load_state_dict(state, strict=True, assign=True)
    model.patch_embed.mask_token.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
