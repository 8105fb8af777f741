"""Architecture of the shapes teacher: Stable Diffusion's component classes at laptop size.

32 px RGB images; an AutoencoderKL with two levels (32 -> 16 px, 4 latent
channels, 3x compression; SD's is 48x, but at 8x8 latents the shipped
decoder could not draw a triangle); a 3-level UNet2DConditionModel over 16x16
latents, plain convolutions at 16x16 and cross-attention at 8x8 and 4x4, where
a shape's colour and outline are decided; a 2-layer CLIP text encoder over a
16-token context; SD 2.1's DDPM schedule, epsilon prediction. Every dict here
is what diffusers/transformers read from config.json.
"""

from ..models.presets import DDPM_SCHEDULER

IMAGE_PX = 32
LATENT_PX = 16
MAX_TOKENS = 16

# The teacher's BPE tokenizer, written out: the merges a ``tokenizers`` trainer found on the captions when
# the shipped teacher was made. Trainers break ties in hash order, so these are fixed here, not retrained:
# the text encoder's embedding rows are indexed by them. Ids: CLIP's two special tokens, the alphabet,
# the word-final characters, then one token per merge, in this order.
TOKENIZER_ALPHABET = "!',-.0123456789?abcdefghijklmnopqrstuvwxyz"
TOKENIZER_WORD_FINALS = ("e", "n", "d", "a", "w")
TOKENIZER_MERGES = (
    "l e</w>", "a n", "a r", "c i", "c le</w>", "g le</w>", "i an", "q u", "r e", "r cle</w>", "r ian", "s qu",
    "t rian", "ar e</w>", "ci rcle</w>", "squ are</w>", "trian gle</w>", "a g", "a n</w>", "b l", "c y", "e l",
    "e n", "e n</w>", "g re", "l o", "m ag", "t a</w>", "u e</w>", "y el", "re d</w>", "bl ue</w>", "cy an</w>",
    "en ta</w>", "gre en</w>", "lo w</w>", "mag enta</w>", "yel low</w>",
    "s h", "p e</w>", "sh a", "sha pe</w>",
)

VAE = dict(
    block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=IMAGE_PX, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
UNET = dict(
    sample_size=LATENT_PX, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 2), cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
    flip_sin_to_cos=True, freq_shift=0,
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="gelu", max_position_embeddings=MAX_TOKENS, projection_dim=64)
SCHEDULER = DDPM_SCHEDULER  # SD 2.1's schedule
# The world's CLIP (SwiftBrush v2's CLIP loss, docs/method.md §6): transformers' CLIPModel at laptop size. Its
# text tower is the teacher text encoder's architecture over the same tokenizer (the loss scores the student's
# images against the prompt's token ids); its image tower a ViT over the 32 px renders in 4 px patches.
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=IMAGE_PX, patch_size=4, num_channels=3, hidden_act="quick_gelu")
CLIP_PROJECTION = 64
