"""The site ↔ server message contract in one place: instruction keys, reply metrics, error codes.

Instructions (train, evaluate, query) carry the global weights in an ArrayRecord "arrays" and these
keys in a ConfigRecord "config". Replies carry the site's weights (train only) and one MetricRecord
"metrics" of aggregate numbers: nothing else leaves a site (tests/test_message_audit.py).
"""

from __future__ import annotations

# ---------------------------------------------------------------- instruction keys (ConfigRecord "config")
CONFIG = "config"
ARRAYS = "arrays"
SERVER_ROUND = "server-round"  # set by Flower's strategies in configure_train / configure_evaluate
LOCAL_EPOCHS = "local-epochs"
LEARNING_RATE = "learning-rate"
RUN_KEY = "run-key"  # names the run to the sites (their ε ledger), stable across resumes
PROXIMAL_MU = "proximal-mu"  # FedProx, dice-weighted, flower:FedProx (strategies.fedprox.ProximalTerm)
IN_CHANNELS = "in-channels"  # image channels of the global model; a site with other data answers CHANNELS_CODE
LOCAL_NORM = "local-norm"  # FedBN: the site keeps its own normalisation layers; they are not in arrays either way
LOCAL_HEAD = "local-head"  # FedPer: the site trains its own output stage (clients.personal); it is still sent
DITTO_LAMBDA = "ditto-lambda"  # Ditto: the site also trains its personal model, held near the global one
SCAFFOLD_C = "scaffold-c"  # SCAFFOLD: ArrayRecord of the server control variate c (train instructions)

# ---------------------------------------------------------------- reply metrics (MetricRecord "metrics")
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_DICE = "val-dice"
TRAIN_SECONDS = "train-seconds"
DICE = "dice"  # mean Dice over the scored structures (fedseg.labels)
EVAL_SECONDS = "eval-seconds"
SITE_ID = "site-id"
# evaluate with run-config postprocess "enhancing-tumour": the mean validation ET Dice at each candidate
# threshold, one metric per candidate (fedseg.enhancing.candidate_key: this prefix + the voxel count)
VAL_ENHANCING_PREFIX = "val-dice-ET-min-voxels-"
# evaluate at a site that keeps a whole personal model (Ditto): the mean validation Dice of its mean with
# the global model per structure and personal weight (fedseg.personal_mix.candidate_key: this prefix +
# the structure + the weight)
VAL_PERSONAL_WEIGHT_PREFIX = "val-dice-personal-weight-"
PERSONAL_DICE = "personal-dice"  # evaluate: test Dice of the site's personal model (FedBN, Ditto)
SCAFFOLD_DC = "scaffold-dc"  # train reply: ArrayRecord of the change of the site's control variate cᵢ
# per scored structure: LabelScheme.metric_names (dice-class-1, …, or dice-WT, dice-TC, dice-ET);
# with DP-SGD also fedseg.privacy's dp-epsilon, dp-delta, dp-noise-multiplier

# ---------------------------------------------------------------- error reply codes
SITE_ERROR_CODE = 100  # the site's data or training failed; the reason has no paths or subject ids
PRIVACY_BUDGET_CODE = 101  # DP-SGD: the next fit would exceed dp-target-epsilon; the site trains no more
CHANNELS_CODE = 102  # the site's images have another channel count than the global model takes
OUT_OF_MEMORY_CODE = 103  # the site ran out of (GPU) memory; the reason says only that
SECAGG_CODE = 104  # secure aggregation: the site refused (its update failed its own checks, or a stage message
# did not fit its state of the round); the reason is a fixed phrase
# An error reply's reason is built from fixed text, kinds and counts (clients.client_app.public_reason),
# never from an exception's message.

# ---------------------------------------------------------------- secure aggregation (fedseg.secagg)
# The stages of a secure round are train messages with these actions ("train.<action>"); their
# protocol values travel in a ConfigRecord SECAGG (with RUN_KEY and SERVER_ROUND naming the round).
SECAGG_SETUP = "secagg_setup"  # → index, count, threshold; ← the site's two public keys
SECAGG_SHARE = "secagg_share"  # → every participant's public keys; ← encrypted shares, one per other site
SECAGG_TRAIN = "secagg_train"  # → train instruction + shares for the site; ← metrics + SECAGG_MASKED
SECAGG_UNMASK = "secagg_unmask"  # → survivors, dropped; ← their seed shares, their mask-key shares
SECAGG = "secagg"
SECAGG_INDEX = "index"
SECAGG_COUNT = "count"
SECAGG_THRESHOLD = "threshold"
SECAGG_CIPHER_KEY = "cipher-key"  # X25519 public key for the share transport
SECAGG_MASK_KEY = "mask-key"  # X25519 public key for the pairwise masks
SECAGG_PARTICIPANTS = "participants"
SECAGG_CIPHER_KEYS = "cipher-keys"
SECAGG_MASK_KEYS = "mask-keys"
SECAGG_DESTINATIONS = "destinations"
SECAGG_SOURCES = "sources"
SECAGG_SHARES = "shares"  # AES-GCM ciphertexts of (seed share, mask-key share), site to site
SECAGG_BOUND = "bound"  # largest |update value| a site may encode (run-config secure-aggregation-bound)
SECAGG_MAX_UPDATE_RATIO = "max-update-ratio"  # the strategy's update-norm check, run by the site
SECAGG_SURVIVORS = "survivors"
SECAGG_DROPPED = "dropped"
SECAGG_SEED_SHARES = "seed-shares"
SECAGG_KEY_SHARES = "key-shares"
SECAGG_MASKED = "secagg-masked"  # train reply: ArrayRecord of the masked, encoded update (uint64)
SECAGG_SUMMED = "secagg-summed"  # metric of the unmasked aggregate: how many sites' updates it sums
# dp-distributed (instruction config): each site clips its update to norm DP_CLIP, adds Gaussian noise of
# std DP_SITE_NOISE_STD from DP_SITE_NOISE_SOURCE and counts once (uniform weights)
DP_CLIP = "dp-site-clip"
DP_SITE_NOISE_STD = "dp-site-noise-std"
DP_SITE_NOISE_SOURCE = "dp-site-noise-source"
