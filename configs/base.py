"""Defaults for every experiment. An experiment module sets only what differs.

Keys up to `val_targets` are insightface's (arcface_torch/configs/base.py and its
experiment configs) with the same names and meanings; the keys below them, and the
marked block beside the Partial FC keys, are this project's additions.
"""
from utils.config import Config

config = Config()

# --- insightface keys -------------------------------------------------------
config.margin_list = (1.0, 0.5, 0.0)  # (m1, m2, m3): cos(m1*theta + m2) - m3; ArcFace
config.network = "r50"
config.resume = False  # continue from the checkpoints in `output`
config.save_all_states = False  # also write per-rank resume states (checkpoint_gpu_{rank}.pt)
config.output = None  # default: work_dirs/<config name>
config.embedding_size = 512

# Partial FC
config.sample_rate = 1.0  # fraction of class centres used per step (positives always kept)
config.interclass_filtering_threshold = 0.0  # 0: off
# (this project's) the head's memory and the GPU's kernel choice
config.fc_state_dtype = "float32"  # or "bfloat16": the centres' momentum / Adam moments, stochastically rounded
# Rows of the global batch whose [rows x sampled classes] logits exist at once (0: all). At 64 GPUs
# and ~1B identities the whole batch's logits do not fit; 256 does (docs/memory.md).
config.logits_chunk_rows = 0
config.cudnn_benchmark = True  # CUDA: torch.backends.cudnn.benchmark, as insightface sets it (fastest conv kernels)

config.fp16 = False  # CUDA: float16 autocast + GradScaler
config.batch_size = 128  # per process

config.optimizer = "sgd"  # or "adamw" (lr ~1e-3, weight_decay ~0.1)
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4

config.verbose = 2000  # evaluate the verification sets every `verbose` steps
config.frequent = 10  # log every `frequent` steps
config.dali = False  # NVIDIA DALI data pipeline (GPU, needs nvidia-dali)
config.gradient_acc = 1  # batches per optimizer step
config.seed = 2048
config.num_workers = 2

# Weights & Biases (insightface's keys, plus notes). TensorBoard logs always go to
# <output>/tensorboard; wandb's files to <output>/wandb. WANDB_MODE=offline works without
# network (upload later with `wandb sync`). Tracking problems never stop training.
config.using_wandb = False
config.wandb_key = "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"  # placeholder: use WANDB_API_KEY / `wandb login`
config.wandb_entity = None  # team or user; None: the API key's default entity
config.wandb_project = "project"
config.suffix_run_name = None  # run name: %y%m%d_%H%M_GPU{rank}[_{suffix_run_name}]
config.notes = None  # the run's description in wandb
config.wandb_log_all = True  # a run per rank (each logs its own loss); False: rank 0 only
config.save_artifacts = False  # upload model.pt after every epoch ({run}_E{epoch}) and at the end ({run}_Final)
config.wandb_resume = False  # continue the wandb run recorded in <output>/wandb_run_id.json (resume, elastic restart)

config.rec = "synthetic"  # a RecordIO folder, an image folder, or "synthetic" (random tensors)
config.num_classes = None  # None: read from the data set
config.num_image = None  # None: read from the data set
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []  # e.g. ["lfw", "cfp_fp", "agedb_30"]: <rec>/<name>.bin

# --- this project's keys ----------------------------------------------------
config.margin_scale = 64.0  # s of the margin softmax
# The margin loss (docs/losses.md). "combined" is cos(m1*theta + m2) - m3 from margin_list; the
# others: arcface, cosface, adaface, magface, curricularface, elasticface_arc, elasticface_cos.
config.loss = "combined"
config.loss_params = {}  # the loss's parameters, e.g. dict(m=0.4, h=0.333); unset: the paper's default, s: margin_scale
config.num_subcenters = 1  # sub-center ArcFace: K centres per class, the class's cosine is the max (paper: 3)
config.clip_grad_norm = 5.0  # max L2 norm of the backbone gradient; 0 disables
config.dropout = 0.0  # before the backbone's embedding layer
config.precision = "auto"  # auto | fp32 | bf16 | fp16 (auto: fp16 if fp16=True on CUDA, else bf16 where fast, else fp32)
config.channels_last = True  # NHWC memory format for the convolutional backbones
config.compile = False  # torch.compile the backbone
config.gradient_checkpointing = None  # None: the backbone's default (on for vit_b/l/h)
config.eval_at_start = False  # evaluate val_targets before the first step
config.skip_bad_images = False  # skip undecodable images (warn and count) instead of stopping
config.save_every_steps = 2000  # checkpoint interval in steps (also at every epoch end and at the end); 0: epochs only
config.keep_checkpoints = 2  # complete checkpoint sets kept in <output>/checkpoints
config.max_nonfinite_steps = 20  # stop after this many consecutive steps with a non-finite loss/gradient
config.pretrained = None  # backbone state_dict to start from (insightface model.pt / backbone.pth)
config.pretrained_fc = None  # merged class centres [num_classes, embedding_size] to start the head from
config.max_steps = None  # cap the number of optimizer steps (quick runs); None: full schedule
config.device = None  # None: CUDA when available, else CPU
config.dist_timeout_minutes = 30.0
config.synthetic_faces = None  # dict of tools/make_synthetic_faces.py parameters: generate `rec` if missing

# --- knowledge distillation (docs/distillation.md) -----------------------------
# total loss = margin loss + distill_weight * distillation loss against a frozen teacher
config.teacher = None  # the teacher's weights: our or insightface's model.pt / backbone.pth, or a checkpoint
config.teacher_network = None  # the teacher's architecture, a get_model name (e.g. "r100"); needed with `teacher`
config.teacher_embedding_size = None  # None: read from the teacher's weights
config.distill_weight = 0.0  # 0: distillation off
config.distill_loss = "cosine"  # cosine | mse | relation (relation: any student/teacher sizes, no projection)
