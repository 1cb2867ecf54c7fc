"""WF42M, vit_b_dp005_mask_005: published arcface_torch hyper-parameters."""
from utils.config import Config

config = Config()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_b_dp005_mask_005"
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.optimizer = "adamw"
config.weight_decay = 0.1
config.batch_size = 256
config.gradient_acc = 12  # global batch 256 x 12 per GPU step
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []
