"""Infinity's BSQ-VAE: a convolutional autoencoder with multi-scale binary spherical quantization.

Same math as the released tokenizer (FoundationVision/Infinity infinity/models/bsq_vae/flux_vqgan.py
and multiscale_bsq.py, image path, `cnn_type='2d'`, no attention, `new_quant=True`), written with
plain nn.Conv2d / nn.GroupNorm. Official checkpoints wrap them (`X.conv.weight`, `X.norm.weight`) and
store the quantizer's `lfq.mask` buffer twice; `load_state_dict` accepts that layout and
`official_state_dict` gives it back.

Spatial patchify (`spatial_patchify=True`, the Infinity-8B tokenizer `infinity_vae_d56_f8_14_patchify.pth`:
14 bits, stride 8, ch_mult (1, 2, 4, 4)): the transformer sees one token per 2 x 2 latent positions, with
k = 4d bits (56). Official code: tools/run_infinity.py load_visual_tokenizer (patch_size 8, ch_mult
[1, 2, 4, 4]); infinity/models/infinity.py autoregressive_infer_cfg (`vae_scale_schedule` = 2h, 2w;
`pixel_shuffle` of the sampled bits, `pixel_unshuffle` of the next input) and bitwise_self_correction.py
flip_requant (`pixel_unshuffle` of the inputs and of the bit labels). A token's bit c*4 + 2i + j is latent
bit c of position (2y + i, 2x + j) (torch's pixel_(un)shuffle order). Every method here that takes a
`schedule` takes the transformer's token schedule and token bits (B, h, w, k); the quantizer itself runs
on `latent_schedule(schedule)` (2h, 2w per scale). Without patchify the two are the same and k = d.

Shape letters: B batch, d bits per latent position (= latent channels), k bits per transformer token
(`token_dim`: 4d with spatial patchify, else d), H/W latent map, h/w one scale's map, L tokens of a
whole schedule.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.errors import CheckpointError, ConfigError

Schedule = list[tuple[int, int, int]]
_OFFICIAL_WRAPPED = re.compile(r"\.(conv|norm)\.(weight|bias)$")
_OFFICIAL_MASKS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def _group_norm(ch: int) -> nn.GroupNorm:
    # flux_vqgan.py Normalize: 32 groups, or 24 when 32 does not divide the channels.
    if ch % 32 and ch % 24:
        raise ConfigError(f"BSQ-VAE channels must be divisible by 32 or 24, got {ch}")
    return nn.GroupNorm(32 if ch % 32 == 0 else 24, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as flux_vqgan.py Downsample


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(ch, ch), ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_ch: int, n_down: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            cin, cout = ch * in_mult[i], ch * mult
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks)]
            self.down.append(_level(blocks, Downsample(cout) if i < n_down else None, "downsample"))
        self.mid = _mid(ch * ch_mult[-1])
        self.norm_out = _group_norm(ch * ch_mult[-1])
        self.conv_out = nn.Conv2d(ch * ch_mult[-1], z_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_ch: int, n_up: int):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_ch, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built deepest first, stored shallowest first (official order)
            cout = ch * ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)]
            levels.insert(0, _level(blocks, Upsample(cout) if 1 <= i <= n_up else None, "upsample"))
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQVAE(nn.Module):
    """Multi-scale BSQ tokenizer. Defaults build the released d32 model (`infinity_vae_d32_reg.pth`);
    `BSQVAE(codebook_dim=14, ch_mult=(1, 2, 4, 4), patch_size=8, spatial_patchify=True)` the Infinity-8B
    one (`infinity_vae_d56_f8_14_patchify.pth`, see the module docstring).

    `up_mode` / `down_mode` are the interpolations of multiscale_bsq.py (`z_interplote_up`/`_down`).
    """

    def __init__(self, codebook_dim: int = 32, base_ch: int = 128, num_res_blocks: int = 2,
                 ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4), patch_size: int = 16, spatial_patchify: bool = False):
        super().__init__()
        n_down = int(math.log2(patch_size))
        if 2 ** n_down != patch_size or n_down > len(ch_mult):
            raise ConfigError(f"patch_size must be a power of 2 up to 2**len(ch_mult), got {patch_size}")
        self.codebook_dim = self.embed_dim = codebook_dim
        self.patch_size, self.spatial_patchify = patch_size, bool(spatial_patchify)
        self.token_dim = 4 * codebook_dim if spatial_patchify else codebook_dim  # k, the transformer's bits
        self.token_stride = 2 * patch_size if spatial_patchify else patch_size  # pixels per token side (16 both releases)
        self.up_mode, self.down_mode = "trilinear", "area"
        self.encoder = Encoder(base_ch, tuple(ch_mult), num_res_blocks, codebook_dim, n_down)
        self.decoder = Decoder(base_ch, tuple(ch_mult), num_res_blocks, codebook_dim, n_down)
        self.register_load_state_dict_pre_hook(_from_official)

    # ---- spatial patchify (token schedule <-> latent grid) ----
    def latent_schedule(self, schedule: Schedule) -> Schedule:
        """The quantizer's (t, H, W) per scale for a token schedule: (t, 2h, 2w) with spatial patchify
        (infinity.py `vae_scale_schedule`), else the schedule itself."""
        if not self.spatial_patchify:
            return [tuple(s) for s in schedule]
        return [(t, 2 * h, 2 * w) for t, h, w in schedule]

    def bits_to_tokens(self, bits_BHWd: torch.Tensor) -> torch.Tensor:
        """Latent bits (B, 2h, 2w, d) -> token bits (B, h, w, 4d) (flip_requant: pixel_unshuffle); identity
        without spatial patchify."""
        if not self.spatial_patchify:
            return bits_BHWd
        return F.pixel_unshuffle(bits_BHWd.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)

    def tokens_to_bits(self, bits_Bhwk: torch.Tensor) -> torch.Tensor:
        """Token bits (B, h, w, 4d) -> latent bits (B, 2h, 2w, d) (autoregressive_infer_cfg: pixel_shuffle);
        identity without spatial patchify."""
        if not self.spatial_patchify:
            return bits_Bhwk
        return F.pixel_shuffle(bits_Bhwk.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)

    def codes_to_tokens(self, x_Bd1HW: torch.Tensor) -> torch.Tensor:
        """A latent map (B, d, 1, H, W) -> transformer input (B, H*W/4, 4d) (pixel_unshuffle, then tokens in
        raster order), or (B, H*W, d) without spatial patchify."""
        x = x_Bd1HW.squeeze(2)
        if self.spatial_patchify:
            x = F.pixel_unshuffle(x, 2)
        return x.flatten(2).transpose(1, 2)

    # ---- quantization helpers (multiscale_bsq.py BSQ) ----
    def _quantize(self, r_Bd1hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BSQ of one scale: l2-normalise each token, snap to +-1/sqrt(d). Returns (codes, bits (B,h,w,d))."""
        z = F.normalize(r_Bd1hw.permute(0, 2, 3, 4, 1).float(), dim=-1)  # B1hwd, tokens last as in BSQ.forward
        zhat = torch.where(z > 0, 1.0, -1.0).to(z) * (1.0 / self.codebook_dim ** 0.5)  # quantize_new
        q = z + (zhat - z).detach()  # straight-through; kept verbatim so residuals match the release bit for bit
        return q.permute(0, 4, 1, 2, 3), (q > 0)[:, 0].to(torch.uint8)

    def bits_to_codes(self, bits_Bhwk: torch.Tensor) -> torch.Tensor:
        """{0,1} token bits (B, h, w, k) -> unit-norm codes (B, d, 1, H, W) on the latent grid (BSQ.indices_to_codes,
        bit labels; H, W = 2h, 2w with spatial patchify)."""
        s = 1 / math.sqrt(self.codebook_dim)  # codebook_scale
        codes = F.normalize(self.tokens_to_bits(bits_Bhwk).float() * (2 * s) - s, dim=-1)
        return codes.permute(0, 3, 1, 2).unsqueeze(2)

    # ---- public API ----
    def encode_features(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Raw encoder features (B, d, H/p, W/p) for an image in [-1, 1] (p = `patch_size`)."""
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
            raise ConfigError(f"expected images (B, 3, H, W), got {tuple(img_B3HW.shape)}")
        return self.encoder(img_B3HW).float()

    def quantize(self, h_BdHW: torch.Tensor, schedule: Schedule):
        """Residual multi-scale BSQ (MultiScaleBSQ.forward) on `latent_schedule(schedule)`. Returns (z (B, d,
        H, W) summed codes, token bits per scale (B, h, w, k), var inputs per scale > 0 on the latent grid
        (B, d, 1, H_s, W_s) by area down-sampling, as the release's `vae.encode`)."""
        x = h_BdHW.unsqueeze(2).float()
        full = tuple(x.shape[2:])
        schedule = self.latent_schedule(schedule)
        if tuple(schedule[-1]) != full:
            raise ConfigError(f"last scale {tuple(schedule[-1])} does not match the latent map {full}")
        residual, z, bits, var_inputs = x, 0.0, [], []
        for si, pn in enumerate(schedule):
            pn = tuple(pn)
            r = residual if pn == full else F.interpolate(residual, size=pn, mode=self.down_mode)
            q, b = self._quantize(r)
            if pn != full:
                q = F.interpolate(q, size=full, mode=self.up_mode).contiguous()
            residual = residual - q.detach()
            z = z + q
            bits.append(self.bits_to_tokens(b))
            if si != len(schedule) - 1:
                var_inputs.append(F.interpolate(z, size=tuple(schedule[si + 1]), mode=self.down_mode).contiguous())
        return z.squeeze(2), bits, var_inputs

    def encode_bits(self, img_B3HW: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """Token bit maps per scale, (B, h, w, k) in {0, 1} (uint8); bit 0 is the most significant."""
        return self.quantize(self.encode_features(img_B3HW), schedule)[1]

    def summed_codes(self, bits: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        """Sum of every scale's codes up-sampled to the last scale's latent map: (B, d, 1, H, W)."""
        full = tuple(self.latent_schedule(schedule)[-1])
        return sum(F.interpolate(self.bits_to_codes(b), size=full, mode=self.up_mode) for b in bits)

    def bits_to_var_input(self, bits: list[torch.Tensor], schedule: Schedule,
                          mode: str = "trilinear") -> torch.Tensor:
        """Teacher-forcing input (B, L - 1, k): the running sum of codes, resampled to each next scale
        (and patchified to 4d channels per token with spatial patchify).

        Matches official BitwiseSelfCorrection.flip_requant without bit flips, which resamples with
        'trilinear' both ways; `mode='area'` resamples down to the next scale by area instead.
        """
        latent = self.latent_schedule(schedule)
        full, cum, out = tuple(latent[-1]), 0.0, []
        for si in range(len(schedule) - 1):
            cum = cum + F.interpolate(self.bits_to_codes(bits[si]), size=full, mode=self.up_mode).contiguous()
            nxt = F.interpolate(cum, size=tuple(latent[si + 1]), mode=mode).contiguous()
            out.append(self.codes_to_tokens(nxt))  # B d 1 H W -> B (h w) k
        return torch.cat(out, 1)

    def decode(self, z_BdHW: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, d, H, W) -> image (B, 3, pH, pW) clamped to [-1, 1] (p = `patch_size`)."""
        return self.decoder(z_BdHW).clamp(-1, 1)

    def decode_bits(self, bits: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        return self.decode(self.summed_codes(bits, schedule).squeeze(2))


def _from_official(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: map official wrapper names onto ours and drop the constant `lfq.mask` buffers."""
    ours = set(module.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local in ours:
            continue
        if local in _OFFICIAL_MASKS:
            mask = state_dict.pop(key)
            d = module.codebook_dim
            if mask.numel() != d or not torch.equal(mask.long().cpu(), 2 ** torch.arange(d - 1, -1, -1)):
                raise CheckpointError(f"{key} is not 2**arange({d - 1}..0): wrong codebook_dim?")
        elif _OFFICIAL_WRAPPED.search(local):
            state_dict[prefix + _OFFICIAL_WRAPPED.sub(r".\2", local)] = state_dict.pop(key)


def official_vae_state_dict(vae: BSQVAE) -> dict[str, torch.Tensor]:
    """State dict in the released layout (Conv/Normalize wrappers, `lfq.mask` under both names)."""
    wrapped = {n: "conv" if isinstance(m, nn.Conv2d) else "norm"
               for n, m in vae.named_modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))}
    out = {}
    for key, value in vae.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        out[f"{mod}.{wrapped[mod]}.{leaf}" if mod in wrapped else key] = value
    mask = 2 ** torch.arange(vae.codebook_dim - 1, -1, -1)
    for key in _OFFICIAL_MASKS:
        out[key] = mask.clone()
    return out
