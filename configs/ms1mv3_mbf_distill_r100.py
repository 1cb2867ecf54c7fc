"""MS1MV3, MobileFaceNet student distilled from an r100 teacher (docs/distillation.md).

The student's settings are configs/ms1mv3_mbf.py (insightface's published mbf recipe);
the teacher is an r100 trained with configs/ms1mv3_r100.py, whose output folder holds
its model.pt. insightface's released MS1MV3 r100 backbone.pth works as well.

    torchrun --nproc_per_node=8 train.py configs/ms1mv3_mbf_distill_r100

The margin loss stays at weight 1; the total loss is margin + distill_weight * distill.
"""
from utils.config import Config

config = Config()

# --- the student: insightface's MS1MV3 mbf recipe
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.network = "mbf"
config.embedding_size = 512  # the teacher's: cosine needs no projection
config.sample_rate = 1.0
config.fp16 = True  # the teacher runs under the same float16 autocast
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 40
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]

# --- the teacher
config.teacher = "work_dirs/ms1mv3_r100/model.pt"  # configs/ms1mv3_r100.py's output, or insightface's backbone.pth
config.teacher_network = "r100"
config.teacher_embedding_size = None  # read from the weights (512)
config.distill_loss = "cosine"
# The cosine loss is in [0, 2] and its gradient per sample is O(1), while the margin
# softmax with s = 64 pulls up to 64 times harder on the cosine to the class centre: a
# weight of 10 lets the teacher's direction count without drowning the labels. A starting
# point, not a measured optimum on MS1MV3: try 1 to 64 on a short run.
config.distill_weight = 10.0
