"""VQVAE: VAR's multi-scale residual VQ tokenizer (Tian et al., 2024, "Visual Autoregressive Modeling").

An image is encoded to a feature map f (C=z_channels, 16x down-sampled) and quantised coarse to fine:
at scale k the residual is area-down-sampled to pn_k x pn_k, each vector is replaced by its nearest
code, the code map is bicubic-up-sampled back, refined by a conv phi_k and subtracted from the residual.
Same math and parameter names as FoundationVision/VAR models/vqvae.py, quant.py and basic_vae.py, so
the official `vae_ch160v4096z32.pth` loads as it is (its `quantize.ema_vocab_hit_SV` training statistic
is accepted and dropped).

Shapes: B batch, C channels, H/W (or h/w) height/width, l = pn*pn tokens of one scale, L all tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.errors import ArboothError
from arbooth.models.var_presets import VAE_PRESET

VAE_DROPPED_KEYS = ("quantize.ema_vocab_hit_SV",)  # official buffer: usage statistics of VQ training


class ImageSizeError(ArboothError, ValueError):
    """An image batch does not have the shape the tokenizer was built for."""


# ------------------------------------------------------------------ encoder / decoder (basic_vae.py)
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).unbind(1)  # each B C hw
        attn_Bnn = torch.bmm(q.transpose(1, 2), k).mul(C ** -0.5).softmax(dim=2)
        out_BCn = torch.bmm(v, attn_Bnn.transpose(1, 2))
        return x_BChw + self.proj_out(out_BCn.view(B, C, h, w))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the official (taming) encoder


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if i == len(ch_mult) - 1:  # self-attention only at the lowest resolution
                    level.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample2x(block_in)
            up.insert(0, level)  # stored finest first, as the official checkpoint numbers them
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------ residual quantizer (quant.py)
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the refinement applied to each up-sampled code map."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


def _phi_ticks(k: int) -> torch.Tensor:
    # official PhiPartiallyShared/PhiNonShared: K phis placed evenly over [0, 1] (a special grid for K=4)
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    return torch.linspace(margin, 1 - margin, k, dtype=torch.float64, device="cpu")


class PhiPartiallyShared(nn.Module):
    """K phis shared across scales; scale si of SN uses the phi whose tick is nearest si/(SN-1)."""

    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def pick(self, at_0_to_1: float) -> nn.Module:
        ticks = _phi_ticks(len(self.qresi_ls))
        return self.qresi_ls[int((ticks - at_0_to_1).abs().argmin())]


class PhiShared(nn.Module):
    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def pick(self, at_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    def pick(self, at_0_to_1: float) -> nn.Module:
        return self[int((_phi_ticks(len(self)) - at_0_to_1).abs().argmin())]


class VectorQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...], using_znorm: bool,
                 quant_resi: float, share_quant_resi: int):
        super().__init__()
        self.vocab_size, self.Cvae, self.patch_nums, self.using_znorm = vocab_size, z_channels, patch_nums, using_znorm
        make = (lambda: Phi(z_channels, quant_resi)) if abs(quant_resi) > 1e-6 else nn.Identity
        if share_quant_resi == 0:  # one phi per scale
            self.quant_resi = PhiNonShared([make() for _ in patch_nums])
        elif share_quant_resi == 1:  # a single phi for every scale
            self.quant_resi = PhiShared(make())
        else:  # the released tokenizer: 4 phis shared across the 10 scales
            self.quant_resi = PhiPartiallyShared([make() for _ in range(share_quant_resi)])
        self.embedding = nn.Embedding(vocab_size, z_channels)

    def phi(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        SN = len(self.patch_nums)
        return self.quant_resi.pick(si / (SN - 1) if SN > 1 else 0.0)(h_BChw)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row: (N, C) -> (N,)."""
        w_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(w_VC.T, dim=0), dim=1)
        # |z|^2 + |e|^2 - 2 z.e, evaluated with the same addmm as the official code so ties resolve alike
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + w_VC.square().sum(dim=1)
        return torch.argmin(torch.addmm(d_NV, z_NC, w_VC.T, alpha=-2, beta=1), dim=1)

    def upsample_code(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Code map of scale si, bicubic-up-sampled to the finest scale and refined by phi."""
        B, pn, P = idx_Bl.shape[0], self.patch_nums[si], self.patch_nums[-1]
        h_BChw = self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(P, P), mode="bicubic")
        return self.phi(si, h_BChw)

    def f_to_idxBl_and_fhat(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Quantise coarse to fine; returns the token maps and the final reconstruction f_hat."""
        B, C = f_BChw.shape[:2]
        f_rest, f_hat = f_BChw.detach().clone(), torch.zeros_like(f_BChw)
        idx_Bl_list = []
        for si, pn in enumerate(self.patch_nums):
            z_BChw = f_rest if si == len(self.patch_nums) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx_Bl = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h_BChw = self.upsample_code(si, idx_Bl)
            f_hat, f_rest = f_hat + h_BChw, f_rest - h_BChw
            idx_Bl_list.append(idx_Bl)
        return idx_Bl_list, f_hat

    def idxBl_to_fhat(self, idx_Bl_list: list[torch.Tensor]) -> torch.Tensor:
        f_hat = self.upsample_code(0, idx_Bl_list[0])
        for si in range(1, len(idx_Bl_list)):
            f_hat = f_hat + self.upsample_code(si, idx_Bl_list[si])
        return f_hat

    def next_scale_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """Add scale si's code map h (B, C, pn, pn) to f_hat (official get_next_autoregressive_input)."""
        P = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(P, P), mode="bicubic")
        return f_hat_BChw + self.phi(si, h_BChw)


# ------------------------------------------------------------------ the tokenizer
class VQVAE(nn.Module):
    """Multi-scale VQ tokenizer. Frozen in VAR: the constructor puts it in eval mode without gradients."""

    def __init__(
        self,
        vocab_size: int = VAE_PRESET["vocab_size"],  # defaults: the released tokenizer (var_presets.py)
        z_channels: int = VAE_PRESET["z_channels"],
        ch: int = VAE_PRESET["ch"],
        share_quant_resi: int = VAE_PRESET["share_quant_resi"],
        patch_nums: tuple[int, ...] = VAE_PRESET["patch_nums"],
        quant_resi: float = 0.5,
        using_znorm: bool = False,
        ch_mult: tuple[int, ...] = VAE_PRESET["ch_mult"],  # vq-f16 layout of the released tokenizer
        num_res_blocks: int = VAE_PRESET["num_res_blocks"],
    ):
        super().__init__()
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, z_channels, tuple(patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, z_channels)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(vocab_size, z_channels, self.patch_nums, using_znorm, quant_resi,
                                        share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.register_load_state_dict_pre_hook(_drop_official_buffers)
        self.eval().requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def _encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if img_B3HW.ndim != 4 or tuple(img_B3HW.shape[1:]) != (3, s, s):
            raise ImageSizeError(f"the tokenizer expects images of shape (B, 3, {s}, {s}), "
                                 f"got {tuple(img_B3HW.shape)}; resize or crop them first")
        w = self.quant_conv.weight
        return self.quant_conv(self.encoder(img_B3HW.to(device=w.device, dtype=w.dtype))).float()

    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> token maps, coarse to fine: list of (B, pn*pn) LongTensor."""
        return self.quantize.f_to_idxBl_and_fhat(self._encode(img_B3HW))[0]

    def idxBl_to_var_input(self, idx_Bl_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: f_hat after each scale but the last, area-down-sampled to the
        next scale's size, concatenated: (B, L - first_l, C), float32."""
        q, B = self.quantize, idx_Bl_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], device=idx_Bl_list[0].device,
                            dtype=q.embedding.weight.dtype)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + q.upsample_code(si, idx_Bl_list[si])
            pn = self.patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1).float()

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode a quantised feature map to images in [-1, 1]."""
        w = self.post_quant_conv.weight
        return self.decoder(self.post_quant_conv(f_hat_BChw.to(w.dtype))).float().clamp(-1, 1)

    def idxBl_to_img(self, idx_Bl_list: list[torch.Tensor]) -> torch.Tensor:
        """Token maps -> images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl_list))

    def reconstruct(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encode, quantise and decode: (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.quantize.f_to_idxBl_and_fhat(self._encode(img_B3HW))[1])


def _drop_official_buffers(module, state_dict, prefix, *args) -> None:
    for key in VAE_DROPPED_KEYS:
        state_dict.pop(prefix + key, None)
