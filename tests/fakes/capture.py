"""A fake ``cv2.VideoCapture`` for the device's capture sources."""

import numpy as np


class FakeCapture:
    """A cv2.VideoCapture stand-in: frames numbered from ``start``; fails after ``fail_after``."""

    def __init__(self, start=0, fail_after=None, opened=True):
        self.i, self.fail_after, self.opened, self.start = start, fail_after, opened, start

    def isOpened(self):
        return self.opened

    def read(self):
        if self.fail_after is not None and self.i - self.start >= self.fail_after:
            return False, None
        f = np.full((4, 4, 3), self.i % 256, np.uint8)
        self.i += 1
        return True, f

    def release(self):
        pass
