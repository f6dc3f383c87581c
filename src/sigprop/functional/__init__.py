"""The equations as pure functions (no state, one return type each).

    sigprop.py    signal propagation: comparisons, L_pred, the target generators
                  (Eq. 1, 6, 7, 9, 10, 11, 12), constant-field comparisons (Sec. III-E)
    feedback.py   feedback alignment and direct feedback alignment backward rules
    predsim.py    the local-learning losses of Nøkland & Eidnes 2019 (pred, sim)
"""

from .feedback import (
    dfa_feedback,
    fa_conv2d_backward,
    fa_linear_backward,
)
from .predsim import pool_kernel, predsim_loss, similarity_matrix
from .sigprop import (
    cell_counts,
    cell_sums,
    class_counts,
    class_targets,
    compare,
    compare_paired,
    default_scale,
    dot_compare,
    field_compare,
    field_scale,
    l2_compare,
    label_input_modulation,
    label_projection,
    lay_out,
    loop_back_error,
    loop_back_prediction,
    pred_loss,
    pred_loss_grad,
)

__all__ = [
    "cell_counts", "cell_sums", "class_counts", "class_targets", "compare", "compare_paired", "default_scale", "dfa_feedback",
    "dot_compare", "fa_conv2d_backward", "fa_linear_backward", "field_compare",
    "field_scale", "l2_compare", "label_input_modulation", "label_projection",
    "lay_out", "loop_back_error", "loop_back_prediction", "pool_kernel", "pred_loss", "pred_loss_grad", "predsim_loss",
    "similarity_matrix",
]
