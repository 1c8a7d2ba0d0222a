"""The batch contract: every key a loader, tokenizer, model or training loop exchanges.

Loader (CSR minibatch, numpy arrays; B = cells in the batch, N = nonzeros in the batch):
    CELL_INDEX  int64 [B]    global row of each cell in the store / collection
    INDPTR      int64 [B+1]  CSR row pointers into INDICES / VALUES
    INDICES     int32 [N]    gene index into the store's `var` (or the collection's vocab)
    VALUES      float32 [N]  stored values (raw counts or normalised, see store attrs)
    OBS         dict[str, ndarray [B]] obs columns (integer codes for categoricals)

Tokens (torch tensors; padded layout uses [B, L], packed layout uses [T] = sum of lengths):
    GENE_IDS       int64  [B, L] | [T]  vocabulary token ids, <cls> first in every cell
    VALUE_IDS      int64  [B, L] | [T]  input value bins after masking (mask -> MASK_VALUE)
    TARGET_VALUES  float32[B, L] | [T]  unmasked value bins (regression targets)
    MASKED         bool   [B, L] | [T]  True where the value was hidden (loss positions)
    PADDING_MASK   bool   [B, L]        True at pad positions (padded layout only)
    CU_SEQLENS     int32  [B+1]         cumulative lengths (packed layout only)
    MAX_SEQLEN     int                  longest sequence in a packed batch
    CONDITION_IDS  int64  [B]           optional condition / batch label per cell

Expression inputs (pathway_vae; packed layout, GENE_IDS / CU_SEQLENS / MAX_SEQLEN as above):
    EXPRESSION     float32[T]     log1p-normalised value of each token's gene (<cls>: 1)
    X_RECON        float32[B, G]  the cell over every vocabulary gene, on the decoder's scale
                                  (raw counts for a negative binomial, log1p values for a Gaussian)
    LIBRARY_SIZE   float32[B]     total counts of the cell over its measured genes
    GENE_MEASURED  bool   [B, G]  genes the cell's source store measures (collections only)

Paired batches (the "paired" task: each perturbed cell with a control of its covariate; numpy):
    CELL_INDEX     int64  [B]     global row of each perturbed cell
    CONTROL_INDEX  int64  [B]     global row of the control cell paired with it
    CONDITION      int64  [B]     the perturbed cell's condition (row of the task's table)
    X_TARGET       float32[B, G]  the perturbed cell's expression (log1p-normalised)
    X_CONTROL      float32[B, G]  the paired control cell's expression (log1p-normalised)

Perturbation-model inputs (torch tensors built from a paired batch; K = genes per perturbation):
    PERT_GENES     int64  [B, K]  perturbed genes as rows of the model's perturbation table
                                  (-1 = padding)
    PERT_SIGNS     float32[B, K]  direction of each perturbed gene: +1 / -1 (0 = padding)
    LOSS_GENES     bool   [B, G]  genes the loss counts for this cell's perturbation
    CONTROL_MEAN   float32[B, G]  mean control expression of the cell's covariate
    DELTA_SIGN     float32[B, G]  sign of the cell's condition's mean change (pseudo-bulk)
"""

CELL_INDEX = "cell_index"
INDPTR = "indptr"
INDICES = "indices"
VALUES = "values"
OBS = "obs"

GENE_IDS = "gene_ids"
VALUE_IDS = "value_ids"
TARGET_VALUES = "target_values"
MASKED = "masked"
PADDING_MASK = "padding_mask"
CU_SEQLENS = "cu_seqlens"
MAX_SEQLEN = "max_seqlen"
CONDITION_IDS = "condition_ids"

EXPRESSION = "expression"
X_RECON = "x_recon"
LIBRARY_SIZE = "library_size"
GENE_MEASURED = "gene_measured"

CONTROL_INDEX = "control_index"
CONDITION = "condition"
X_TARGET = "x_target"
X_CONTROL = "x_control"
PERT_GENES = "pert_genes"
PERT_SIGNS = "pert_signs"
LOSS_GENES = "loss_genes"
CONTROL_MEAN = "control_mean"
DELTA_SIGN = "delta_sign"

# Special tokens of every gene vocabulary, in this order, before the genes.
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
MASK_TOKEN = "<mask>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, MASK_TOKEN)
PAD_ID, CLS_ID, MASK_ID = 0, 1, 2

# Value-bin conventions (scGPT): bin 0 = zero expression; masked inputs carry MASK_VALUE.
MASK_VALUE = -1
PAD_VALUE = -2
