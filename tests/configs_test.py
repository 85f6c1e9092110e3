"""Configs: every experiment loads and validates; the dry run reports exact parameter counts."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mrl_jax import models
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax import utils
from mrl_jax import validation
from tests.conftest import REPO
from tests.conftest import load_config

CONFIGS = [
    "configs/digits_resnet_mrl.py", "configs/digits_resnet_mrl.py:mrle",
    "configs/digits_resnet_mrl.py:ff=8", "configs/digits_resnet_mrl.py:runlocal",
    "configs/mnist_resnet_mrl.py", "configs/mnist_resnet_mrl.py:mrle,reader=tf_data",
    "configs/resnet50_imagenet.py:mrl", "configs/resnet50_imagenet.py:mrle",
    "configs/resnet50_imagenet.py:ff=64", "configs/resnet50_imagenet.py:mrl,recipe=standard90",
    "configs/resnet50_imagenet.py:mrl,progressive", "configs/vit_b16_imagenet21k.py:mrl",
    "configs/vit_b16_imagenet21k.py:mrle", "configs/vit_b16_imagenet21k.py:mrl,runlocal",
    "configs/text_wiki.py", "configs/text_wiki.py:contrastive",
    "configs/text_wiki.py:contrastive,two_d", "configs/text_wiki.py:standard",
    "configs/text_wiki.py:contrastive,minilm", "configs/bert_base_mlm.py",
    "configs/bert_base_mlm.py:standard", "configs/image_text_digits.py",
    "configs/image_text_digits.py:sigmoid", "configs/image_text_digits.py:scenes",
    "configs/align_vit_bert.py:mrl",
    "configs/align_vit_bert.py:siglip", "configs/align_vit_bert.py:lit",
]


R50 = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
DIGITS = (2, 4, 8, 16, 32, 64, 128)
VIT = (12, 24, 48, 96, 192, 384, 768)
# (feature dim, head type, sizes with a head, classes) each config must resolve to: the paper's
# nesting for ResNet-50 (8..2048) and ViT-B/16 (12..768), the built-ins' own.
EXPECTED = {
    "configs/digits_resnet_mrl.py": (128, "mrl", DIGITS, 10),
    "configs/digits_resnet_mrl.py:mrle": (128, "mrle", DIGITS, 10),
    "configs/digits_resnet_mrl.py:ff=8": (128, "ff", (8,), 10),
    "configs/resnet50_imagenet.py:mrl": (2048, "mrl", R50, 1000),
    "configs/resnet50_imagenet.py:mrle": (2048, "mrle", R50, 1000),
    "configs/resnet50_imagenet.py:ff=64": (2048, "ff", (64,), 1000),
    "configs/vit_b16_imagenet21k.py:mrl": (768, "mrl", VIT, 21843),
    # Text: the MLM head is tied over the vocabulary (BERT: 30,522); contrastive has none.
    "configs/bert_base_mlm.py": (768, "mlm", VIT, 30522),
    "configs/bert_base_mlm.py:standard": (768, "mlm", (768,), 30522),
    "configs/text_wiki.py": (128, "mlm", (8, 16, 32, 64, 128), 8000),  # its sentencepiece
    "configs/text_wiki.py:contrastive,minilm": (384, "none", (24, 48, 96, 192, 384), 0),
    # Dual encoders: both towers projected to the common width, nested at the paper's sizes.
    "configs/align_vit_bert.py:mrl": (768, "none", VIT, 0),
    "configs/align_vit_bert.py:lit": (2048, "none", R50, 0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates_for_8_devices(name):
  config = load_config(name)
  spec = validation.validate(config, num_devices=8)
  assert spec == models.resolve(config)
  assert config.input.batch_size % 8 == 0
  if name in EXPECTED:
    assert (spec.feature_dim, spec.head, spec.head_sizes, spec.num_classes) == EXPECTED[name]


def test_a_paper_config_at_a_smaller_width_drops_only_the_eval_sizes_that_no_longer_fit(capsys):
  """The paper ResNet-50 at width 8 (d = 256): its published eval sizes above 256 (interpolated,
  rerank, the funnels reaching 2048) are skipped with one notice naming each, instead of an
  error per field; what remains is what evaluation runs (every adaptive-retrieval size within
  d); a training size above d stays an error."""
  from mrl_jax.evaluation import adaptive_retrieval  # pylint: disable=g-import-not-at-top
  config = load_config("configs/resnet50_imagenet.py:mrl")
  config.model.width = 8
  spec = validation.validate(config, num_devices=8)
  assert spec.feature_dim == 256 and spec.head_sizes == (8, 16, 32, 64, 128, 256)
  notes = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
  assert notes == ["NOTE: eval sizes above the feature dim 256 are skipped: config.eval."
                   "extra_sizes [384, 768, 1536]; config.eval.rerank_sizes [512, 2048]; "
                   "config.eval.funnels [(8, (16, 32, 64, 128, 2048), (800, 400, 200, 50, 10)), "
                   "(16, (32, 64, 128, 2048), (800, 400, 200, 50)), (32, (64, 128, 2048), (800, "
                   "400, 200))]"]
  assert config.eval.extra_sizes == (12, 24, 48, 96, 192) and config.eval.rerank_sizes == ()
  assert max(spec.eval_sizes) == 256
  funnels = adaptive_retrieval.funnels_from_config(config.eval, spec.feature_dim)
  assert funnels and max(m for f in funnels for m, _ in f.stages) == 256
  validation.validate(config, num_devices=8)  # once fitted, no second notice
  assert "skipped" not in capsys.readouterr().out
  config.mrl.nesting = "8,16,512"
  with pytest.raises(validation.ConfigError, match="nesting size 512 exceeds feature_dim 256"):
    validation.validate(config, num_devices=8)


def test_resnet50_mrl_dry_run_counts(tmp_path):
  summary = train_lib.dry_run(load_config("configs/resnet50_imagenet.py:mrl"), str(tmp_path))
  on_disk = json.loads((tmp_path / "model_summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert on_disk["num_params_encoder"] == 25_557_032 - 2_049_000  # torchvision R50 minus fc
  # One Dense per size: (sum of sizes + one bias per size) x 1000 classes.
  sizes = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
  assert on_disk["nesting_sizes"] == sizes
  assert on_disk["num_params_heads"] == (sum(sizes) + len(sizes)) * 1000 == 4_097_000
  assert on_disk["num_params_total"] == 23_508_032 + 4_097_000
  assert on_disk["head"] == "mrl" and on_disk["feature_dim"] == 2048
  assert on_disk["num_classes"] == 1000


@pytest.mark.parametrize("arg, heads", [("mrle", 2048 * 1000 + 1000), ("ff=64", 64 * 1000 + 1000)])
def test_mrle_and_ff_heads_have_one_classifier(tmp_path, arg, heads):
  summary = train_lib.dry_run(load_config(f"configs/resnet50_imagenet.py:{arg}"), str(tmp_path))
  assert summary["num_params_heads"] == heads
  assert summary["num_params_encoder"] == 23_508_032


def test_vit_b16_21k_dry_run_uses_the_papers_sizes(tmp_path):
  summary = train_lib.dry_run(load_config("configs/vit_b16_imagenet21k.py:mrl"), str(tmp_path))
  sizes = [12, 24, 48, 96, 192, 384, 768]
  assert summary["nesting_sizes"] == sizes
  assert summary["num_params_encoder"] == 86_567_656 - 769_000
  assert summary["num_params_heads"] == (sum(sizes) + len(sizes)) * 21843


def test_train_py_dry_run_with_cli_override(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/resnet50_imagenet.py:mrle",
       f"--workdir={tmp_path}", "--dry_run", "--config.num_classes=100",
       "--config.mrl.nesting=16,64,2048"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((tmp_path / "model_summary.json").read_text())
  assert summary["num_classes"] == 100 and summary["nesting_sizes"] == [16, 64, 2048]
  assert summary["num_params_heads"] == 2048 * 100 + 100


# The official ResNet-50 run, field by field. Sources (public):
#   FFCV = libffcv/ffcv-imagenet rn50_configs/rn50_40_epochs.yaml (lr 1.7, batch_size 512 per
#          GPU, world_size 8, epochs 40, label_smoothing 0.1, momentum 0.9, weight_decay 1e-4,
#          use_blurpool 1, lr_schedule_type cyclic, min_res 160, max_res 192, start_ramp 29,
#          end_ramp 34, validation resolution 256, lr_tta true)
#   TRAIN = RAIVNLab/MRL train/train_imagenet.py (get_cyclic_lr: [0, lr_peak_epoch=2, epochs] ->
#          [1e-4 lr, lr, 0] per iteration; get_resolution: round(interp / 32) * 32; wd skipped
#          where 'bn' in the name; SGD momentum; torchvision resnet50(); apply_blurpool;
#          Matryoshka_CE_Loss with label smoothing; nesting_list 2**3 .. 2**11)
#   README = RAIVNLab/MRL README.md ("2 A100 GPUs ... linearly downscale the learning rate by 4",
#          --lr.lr=0.425, --dist.world_size=2 with FFCV's 512 per GPU)
#   INFER = RAIVNLab/MRL inference/pytorch_inference.py (Resize 256, CenterCrop 224, no --tta)
#   MRLPY = RAIVNLab/MRL MRL.py (heads are nn.Linear: PyTorch's default init)
OFFICIAL_RESNET50 = [
    ("total_epochs", 40.0, "FFCV epochs: 40"),
    ("input.batch_size", 1024, "README: 2 GPUs x FFCV batch_size 512"),
    ("schedule.base_lr", 0.425, "README --lr.lr=0.425 (FFCV 1.7 / 4)"),
    ("schedule.lr_batch_size", 1024, "README: 0.425 is for 2 x 512 images"),
    ("schedule.name", "one_cycle", "FFCV lr_schedule_type: cyclic"),
    ("schedule.peak_epoch", 2.0, "TRAIN lr_peak_epoch default 2"),
    ("schedule.start_lr_factor", 1e-4, "TRAIN get_cyclic_lr ys[0] = 1e-4 * lr"),
    ("schedule.end_lr_factor", 0.0, "TRAIN get_cyclic_lr ys[2] = 0"),
    ("optim.name", "sgd", "FFCV optimizer: sgd"),
    ("optim.momentum", 0.9, "FFCV momentum: 0.9"),
    ("optim.nesterov", False, "TRAIN ch.optim.SGD(..., momentum=momentum)"),
    ("optim.weight_decay", 1e-4, "FFCV weight_decay: 0.0001"),
    ("optim.weight_decay_rule", "official", "TRAIN bn_params = ['bn' in k]"),
    ("loss.label_smoothing", 0.1, "FFCV label_smoothing: 0.1"),
    ("model.depth", 50, "FFCV arch: resnet50"),
    ("model.width", 64, "torchvision resnet50"),
    ("model.zero_init_residual", False, "torchvision resnet50(zero_init_residual=False)"),
    ("model.blurpool", True, "FFCV use_blurpool: 1"),
    ("mrl.head_init", "torch_linear", "MRLPY nn.Linear"),
    ("mrl.nesting", "halving:8", "TRAIN nesting_list = 2**i for i in 3..11"),
    ("input.progressive_resize.enabled", True, "FFCV min_res 160 / max_res 192"),
    ("input.progressive_resize.min_res", 160, "FFCV min_res: 160"),
    ("input.progressive_resize.max_res", 192, "FFCV max_res: 192"),
    ("input.progressive_resize.start_epoch", 29.0, "FFCV start_ramp: 29"),
    ("input.progressive_resize.end_epoch", 34.0, "FFCV end_ramp: 34"),
    ("input.progressive_resize.multiple", 32, "TRAIN get_resolution rounds to 32"),
    ("input.pp_train.name", "inception_crop", "TRAIN RandomResizedCropRGBImageDecoder"),
    ("input.pp_train.flip", True, "TRAIN RandomHorizontalFlip"),
    ("input.pp_eval.name", "resize_center_crop", "INFER Resize(256), CenterCrop(224)"),
    ("input.pp_eval.resize_size", 256, "INFER IMG_SIZE = 256"),
    ("input.image_size", 224, "INFER CENTER_CROP_SIZE = 224"),
    ("eval.flip_tta", False, "INFER: --tta off for the paper's tables"),
]


@pytest.mark.parametrize("field, official, source", OFFICIAL_RESNET50,
                         ids=[row[0] for row in OFFICIAL_RESNET50])
def test_resnet50_paper_recipe_is_the_official_run(field, official, source):
  config = load_config("configs/resnet50_imagenet.py:mrl")
  value = config
  for key in field.split("."):
    value = value[key]
  assert value == official, source


def test_resnet50_ffcv_eval_option_is_ffcvs_validation():
  """FFCV validation: resolution 256, CenterCropRGBImageDecoder(ratio=224/256), lr_tta."""
  config = load_config("configs/resnet50_imagenet.py:mrl,eval=ffcv")
  assert config.input.pp_eval.name == "center_crop_resize"
  assert config.input.pp_eval.crop_ratio == 224 / 256 and config.input.pp_eval.image_size == 256
  assert config.eval.flip_tta is True


def test_resnet50_progressive_resolution_follows_ffcvs_get_resolution():
  """TRAIN get_resolution per epoch: 160 through epoch 31, 192 from epoch 32 (round(x / 32))."""
  from mrl_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  config = load_config("configs/resnet50_imagenet.py:mrl")
  spe = 100
  pp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=spe)

  def ffcv(epoch, lo=160, hi=192, start=29, end=34):
    if epoch <= start:
      return lo
    if epoch >= end:
      return hi
    return int(np.round(np.interp(epoch, [start, end], [lo, hi]) / 32)) * 32

  for epoch in range(40):
    assert pp.for_step(epoch * spe).image_size == ffcv(epoch), epoch
    assert pp.for_step(epoch * spe + spe - 1).image_size == ffcv(epoch), epoch


# The paper's BERT-Base MRL run, field by field. Sources (public):
#   MRL = Kusupati et al. 2022 (arXiv 2205.13147) Sec. 3 ("MLM reduces to MRL-E") and
#         Appendix C (BERT-Base on English Wikipedia + BooksCorpus, AdamW, lr 1e-4, batch 1024,
#         450K steps, nesting 12..768 as for the other 768-d models)
#   BERT = Devlin et al. 2019 (arXiv 1810.04805) §3.1 (15 % masking, 80/10/10) and A.2
#         (Adam beta 0.9/0.999, L2 weight decay 0.01, 10,000 warmup steps then linear decay,
#         dropout 0.1, GELU, sequence length 128 for most steps); google-research/bert
#         `create_pretraining_data.py` (max_predictions_per_seq 20 at 128 tokens),
#         `optimization.py` (AdamWeightDecayOptimizer eps 1e-6, no decay on LayerNorm / bias,
#         clip_by_global_norm 1.0), `modeling.py` (BertConfig: 768 / 12 / 12 / 3072, vocab
#         30522, 512 positions, 2 token types, initializer_range 0.02, pooler)
PAPER_BERT = [
    ("model_name", "bert", "MRL Appendix C: BERT-Base"),
    ("objective", "mlm", "MRL Sec. 3: masked LM, tied output layer -> MRL-E"),
    ("model.variant", "base", "BERT modeling.py BertConfig 768 / 12 layers / 12 heads"),
    ("model.vocab_size", 30522, "BERT uncased vocab.txt"),
    ("model.max_len", 512, "BERT max_position_embeddings 512"),
    ("model.type_vocab_size", 2, "BERT type_vocab_size 2"),
    ("model.pooler", True, "BERT modeling.py pooled_output"),
    ("model.dropout_rate", 0.1, "BERT A.2 dropout 0.1"),
    ("model.attention_dropout_rate", 0.1, "BERT attention_probs_dropout_prob 0.1"),
    ("mrl.nesting", "12,24,48,96,192,384,768", "MRL Appendix C: 12..768"),
    ("mrl.weights", (), "MRL: weights 1"),
    ("text.mask_rate", 0.15, "BERT §3.1 15 %"),
    ("text.max_predictions", 20, "BERT create_pretraining_data max_predictions_per_seq 20"),
    ("text.max_length", 128, "BERT A.2 sequence length 128"),
    ("text.lowercase", True, "BERT uncased"),
    ("input.batch_size", 1024, "MRL Appendix C: batch 1024"),
    ("total_steps", 450_000, "MRL Appendix C: 450K steps"),
    ("optim.name", "adamw", "MRL Appendix C: AdamW"),
    ("optim.b1", 0.9, "BERT A.2 beta1 0.9"),
    ("optim.b2", 0.999, "BERT A.2 beta2 0.999"),
    ("optim.eps", 1e-6, "BERT optimization.py epsilon 1e-6"),
    ("optim.weight_decay", 0.01, "BERT A.2 weight decay 0.01"),
    ("optim.weight_decay_rule", "kernels", "BERT optimization.py: not LayerNorm, not bias"),
    ("optim.clip_grad_norm", 1.0, "BERT optimization.py clip_by_global_norm 1.0"),
    ("schedule.base_lr", 1e-4, "MRL Appendix C / BERT A.2: lr 1e-4"),
    ("schedule.lr_batch_size", 1024, "the paper's lr at its batch: no rescaling"),
    ("schedule.name", "linear", "BERT A.2: linear decay"),
    ("schedule.warmup_steps", 10_000, "BERT A.2: 10,000 warmup steps"),
    ("schedule.end_lr_factor", 0.0, "BERT optimization.py polynomial_decay to 0"),
]


@pytest.mark.parametrize("field, official, source", PAPER_BERT, ids=[r[0] for r in PAPER_BERT])
def test_bert_base_config_is_the_papers_run(field, official, source):
  config = load_config("configs/bert_base_mlm.py:mrl")
  value = config
  for key in field.split("."):
    value = value[key]
  assert value == official, source


def test_bert_base_dry_run_counts_the_published_parameters(tmp_path):
  """109,482,240 encoder parameters (HF bert-base-uncased, pooler included) plus BERT's MLM
  head: transform 768 x 768 + 768, LayerNorm 2 x 768, output bias 30,522 (the decoder is
  the tied token embedding)."""
  summary = train_lib.dry_run(load_config("configs/bert_base_mlm.py:mrl"), str(tmp_path))
  assert summary["num_params_encoder"] == 109_482_240
  assert summary["num_params_heads"] == 768 * 768 + 768 + 2 * 768 + 30522


@pytest.mark.parametrize("arg, image", [("mrl", 86_567_656 - 769_000), ("siglip", 85_798_656),
                                        ("lit", 23_508_032)])
def test_dual_encoder_dry_run_counts_each_tower(tmp_path, arg, image):
  """Each tower against its published count: ViT-B/16 without its classifier (timm's
  vit_base_patch16_224: 86,567,656 with the 769,000 of its 1000-class head), the torchvision
  ResNet-50 without fc (LiT), BERT-Base without its pooler (109,482,240 - 590,592); the heads
  are the two projections, the log-scale and (SigLIP) the bias."""
  summary = train_lib.dry_run(load_config(f"configs/align_vit_bert.py:{arg}"), str(tmp_path))
  text = 109_482_240 - 590_592
  assert summary["towers"]["image"]["num_params"] == image
  assert summary["towers"]["text"]["num_params"] == text
  assert summary["num_params_encoder"] == image + text
  width = 2048 if arg == "lit" else 768  # projection: the image tower's width
  assert summary["num_params_heads"] == (width + 768) * width + 1 + (arg == "siglip")
  assert json.loads((tmp_path / "model_summary.json").read_text())["towers"] == summary["towers"]


@pytest.mark.parametrize("name", ["digits_resnet_mrl", "mnist_resnet_mrl", "mnist_pairs_multilabel",
                                  "image_text_digits", "text_wiki",
                                  "vit_b16_jft.py:dataset=my_jft,num_classes=18291"])
def test_every_config_dry_runs(tmp_path, name):
  """train.py --dry_run on each config the tests above do not count: the summary's parts add
  up to the model's parameters, and a dual encoder lists its two towers."""
  config = load_config(f"configs/{name}" + ("" if ".py" in name else ".py"))
  summary = train_lib.dry_run(config, str(tmp_path))
  spec = models.resolve(config)
  _, params, _ = state_lib.build_model(config, spec)
  assert summary["num_params_total"] == utils.count_params(params) > 0
  assert ("towers" in summary) == (name == "image_text_digits")
  if name == "image_text_digits":
    assert sum(t["num_params"] for t in summary["towers"].values()) == summary[
        "num_params_encoder"]


# The paper's ALIGN-MRL run. Sources (public):
#   MRL = Kusupati et al. 2022 Sec. 3 ("MRL is applied to both the embeddings that are being
#         contrasted") and Appendix C (ViT-B/16 + BERT-Base, nesting 12..768 as the 768-d models)
#   ALIGN = Jia et al. 2021 (arXiv 2102.05918) §3 (normalized softmax loss both ways, learned
#         temperature, label smoothing) and §5 (projection of BERT's [CLS] to the image width,
#         LAMB, weight decay 1e-5, lr 1e-3 warmed up for 10k steps then linear decay, batch
#         16384, 1.2M steps, 64 text tokens, label smoothing 0.1)
PAPER_ALIGN = [
    ("model_name", "two_towers", "MRL Appendix C: a dual encoder"),
    ("image_tower.model_name", "vit", "MRL Appendix C: ViT-B/16"),
    ("image_tower.variant", "B/16", "MRL Appendix C: ViT-B/16"),
    ("text_tower.model_name", "bert", "MRL Appendix C: BERT-Base"),
    ("text_tower.variant", "base", "MRL Appendix C: BERT-Base"),
    ("text_tower.pool", "cls", "ALIGN §5: the [CLS] token embedding"),
    ("model.projection", 768, "ALIGN §5: a linear layer to the image embedding's width"),
    ("mrl.nesting", "12,24,48,96,192,384,768", "MRL Appendix C: 12..768"),
    ("mrl.weights", (), "MRL: weights 1"),
    ("contrastive.loss", "softmax", "ALIGN §3: normalized softmax"),
    ("contrastive.label_smoothing", 0.1, "ALIGN §5: label smoothing 0.1"),
    ("text.max_length", 64, "ALIGN §5: 64 tokens"),
    ("optim.name", "lamb", "ALIGN §5: LAMB"),
    ("optim.weight_decay", 1e-5, "ALIGN §5: weight decay 1e-5"),
    ("schedule.base_lr", 1e-3, "ALIGN §5: lr 1e-3"),
    ("schedule.name", "linear", "ALIGN §5: linear decay"),
    ("schedule.warmup_steps", 10_000, "ALIGN §5: 10k warmup steps"),
    ("input.batch_size", 16_384, "ALIGN §5: batch 16384"),
    ("total_steps", 1_200_000, "ALIGN §5: 1.2M steps"),
]


@pytest.mark.parametrize("field, official, source", PAPER_ALIGN, ids=[r[0] for r in PAPER_ALIGN])
def test_align_config_is_the_papers_run(field, official, source):
  config = load_config("configs/align_vit_bert.py:mrl")
  value = config
  for key in field.split("."):
    value = value[key]
  assert value == official, source


def test_siglip_and_lit_variants():
  """SigLIP (Zhai et al. 2023): sigmoid loss, bias -10, scale 10; LiT (Zhai et al. 2022): the
  image tower locked, the MRL ResNet-50's nesting."""
  siglip = load_config("configs/align_vit_bert.py:siglip")
  assert (siglip.contrastive.loss, siglip.contrastive.bias_init, siglip.contrastive.scale) == (
      "sigmoid", -10.0, 10.0)
  lit = load_config("configs/align_vit_bert.py:lit")
  assert lit.model.freeze == "image" and lit.image_tower.model_name == "resnet"
  assert models.resolve(lit).head_sizes == R50
