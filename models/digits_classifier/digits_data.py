"""The train/test split of scikit-learn's bundled digits data set, shared by the training script and
the accuracy client so that the client scores the model on exactly the rows it never saw.

load_digits() reads a CSV that ships inside the scikit-learn package: nothing is downloaded.
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x_train, x_test, y_train, y_test); x as FP32 [n, 64] (pixel values 0..16), y as int64."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test
