"""Pathfinder's paddles and pixels: the settings LRA used, one paddle drawn and its collision
mask, the grey-value conventions of scipy.misc, the candidate heads of a growing contour, and
the collision mask of a whole image. `pathfinder_snakes` grows contours from these.

Reimplements the drawing parts of the snakes generator of Linsley, Kim, Veerabadran, Windolf,
Serre (2018), "Learning long-range spatial dependencies with horizontal gated recurrent units"
(NeurIPS), github.com/drewlinsley/pathfinder (snakes.py: draw_line_n_mask, get_coords_cmf,
binary_dilate_custom, translate_coord; snakes2.py: draw_circle), with the settings of the Long
Range Arena (Tay et al. 2021, lra_benchmarks/data/pathfinder.py). Coordinates are (row, col);
angles are in radians from the +col axis, rows growing downwards.

A paddle is a segment of `paddle_length` pixels drawn `aa_scale` times larger with PIL and
shrunk with a Lanczos filter; its mask is the same segment dilated by a disk of radius
`margin * aa_scale` in the enlarged drawing, then shrunk. What scipy.misc did is done the same
way here: imresize and imsave scale floats to uint8 by their range (`bytescale`), imresize then
resizes with PIL's Lanczos filter; the dilation follows OpenCV's cv2.dilate (not mirrored,
pixels outside the image ignored); float kernels are cast to uint8 (only exact 1.0 counts).
"""

import functools
from dataclasses import dataclass

import numpy as np

RESOLUTIONS = (32, 64, 128)
CONTOUR_LENGTHS = (6, 9, 14)


@dataclass(frozen=True)
class Settings:
    """The generator's arguments (names of snakes2_wrapper's Args)."""

    window: int
    contour_length: int
    padding: int
    paddle_length: int
    paddle_thickness: float
    margins: tuple  # paddle_margin_list: one is drawn per image
    marker_radius: float
    seed_distance: int
    continuity: float
    aa_scale: int
    snake_contrast: tuple
    paddle_contrast: tuple
    distractor_length: int
    n_distractors: int
    max_paddle_retrial: int = 2
    max_distractor_retrial: int = 4


# LRA's customised arguments per resolution; K is the numerator of num_distractor_snakes.
_LRA = {
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, margins=(1,), marker_radius=1.5,
             seed_distance=7, continuity=1.0, aa_scale=2, snake_contrast=(2.0,), paddle_contrast=(0.75,), K=20),
    64: dict(padding=1, paddle_length=5, paddle_thickness=1.0, margins=(1,), marker_radius=2.5,
             seed_distance=12, continuity=1.8, aa_scale=2, snake_contrast=(0.8,), paddle_contrast=(1.0,), K=22),
    128: dict(padding=1, paddle_length=5, paddle_thickness=1.5, margins=(2, 3), marker_radius=3.0,
              seed_distance=20, continuity=1.8, aa_scale=2, snake_contrast=(0.9,), paddle_contrast=(1.0,), K=35),
}


def lra_settings(resolution, contour_length):
    """The LRA arguments for `resolution` (32, 64, 128) at difficulty `contour_length` (6, 9, 14):
    distractor_length = contour_length // 3 and n_distractors = K // distractor_length (Python 2)."""
    args = dict(_LRA[resolution])
    K = args.pop("K")
    distractor_length = contour_length // 3
    return Settings(window=resolution, contour_length=contour_length, distractor_length=distractor_length,
                    n_distractors=K // distractor_length, **args)


# ---------------------------------------------------------------- geometry and pixels

def translate(coord, angle, dist):
    """coord moved by dist along angle, each component rounded up (as the original)."""
    return [int(np.ceil(coord[0] + dist * np.sin(angle))), int(np.ceil(coord[1] + dist * np.cos(angle)))]


def flip(angle):
    """angle + pi, kept in [-pi, pi)."""
    return angle + np.pi if angle < 0 else angle - np.pi


@functools.lru_cache(maxsize=None)
def disk(radius):
    """A (2r+1, 2r+1) 0/1 kernel: x^2 + y^2 <= r^2."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x ** 2 + y ** 2 <= radius ** 2).astype(np.uint8)


def dilate(image, kernel):
    """Grey dilation with OpenCV's convention (anchor at the kernel centre, not mirrored, pixels
    outside the image ignored): out[y, x] = max over kernel[i, j] != 0 of image[y+i-ci, x+j-cj].
    Needs image >= 0. Shapes: image (H, W), kernel (kh, kw) -> (H, W)"""
    H, W = image.shape
    kh, kw = kernel.shape
    padded = np.zeros((H + kh - 1, W + kw - 1), dtype=image.dtype)  # (H+kh-1, W+kw-1)
    padded[kh // 2:kh // 2 + H, kw // 2:kw // 2 + W] = image
    out = np.zeros_like(image)
    for i, j in zip(*np.nonzero(kernel)):
        np.maximum(out, padded[i:i + H, j:j + W], out=out)
    return out


def bytescale(image):
    """float -> uint8 as scipy.misc.bytescale: (x - min) * 255 / (max - min), rounded."""
    low, high = float(image.min()), float(image.max())
    scale = 255.0 / ((high - low) or 1.0)
    return (((image - low) * scale).clip(0, 255) + 0.5).astype(np.uint8)


def resize(image, size):
    """scipy.misc.imresize(image, (size, size), interp='lanczos'): bytescale (floats), then PIL
    Lanczos. Returns uint8 (size, size)."""
    from PIL import Image

    u8 = image if image.dtype == np.uint8 else bytescale(image)
    return np.asarray(Image.fromarray(u8, mode="L").resize((size, size), Image.LANCZOS))


@functools.lru_cache(maxsize=8192)
def paddle_patch(angle, length, thickness, margin, aa_scale):
    """The paddle drawn from the centre of a (2h+1)^2 patch, h = length + ceil(thickness) + margin,
    along `angle`; its mask (the paddle dilated by `margin`), both float in [0, 1]; and the mask
    dilated by `margin` once more (what `candidates` reads), on a patch `margin` wider.
    Shapes: returns line (2h+1, 2h+1), mask (2h+1, 2h+1), near (2h+2m+1, 2h+2m+1)"""
    from PIL import Image, ImageDraw

    if round(thickness * aa_scale) != thickness * aa_scale:
        raise ValueError(f"paddle_thickness={thickness} times aa_scale={aa_scale} must be an integer")
    h = length + int(np.ceil(thickness)) + margin
    big, centre = 2 * h * aa_scale + 1, h * aa_scale
    head = translate([centre, centre], angle, length * aa_scale)
    canvas = Image.new("F", (big, big), 0.0)
    ImageDraw.Draw(canvas).line([(centre, centre), (head[1], head[0])], fill=255.0,
                                width=int(round(thickness * aa_scale)))
    line_big = np.asarray(canvas, dtype=np.float32)  # (big, big), 0 or 255
    mask_big = dilate(line_big, disk(margin * aa_scale)).astype(np.uint8)  # (big, big)
    line = resize(line_big, 2 * h + 1).astype(np.float64) / 255  # (2h+1, 2h+1)
    mask = resize(mask_big, 2 * h + 1).astype(np.float64) / 255  # (2h+1, 2h+1)
    near = dilate(np.pad(mask, margin), disk(margin))  # (2h+2m+1, 2h+2m+1)
    line.flags.writeable = mask.flags.writeable = near.flags.writeable = False
    return line, mask, near


def place(patch, shape, centre):
    """A zero image of `shape` with `patch` centred at `centre` (clipped at the borders)."""
    out = np.zeros(shape)
    win, pwin = clip_window(shape, centre, patch.shape[0] // 2)
    out[win] = patch[pwin]
    return out


def marker(size, centre, radius, aa_scale):
    """A disk of `radius` at `centre`, drawn aa_scale times larger and shrunk (Lanczos), in [0, 1].
    Shapes: returns (size, size) float"""
    n = size * aa_scale
    y, x = np.ogrid[-centre[0] * aa_scale:n - centre[0] * aa_scale, -centre[1] * aa_scale:n - centre[1] * aa_scale]
    big = (x ** 2 + y ** 2 <= (radius * aa_scale) ** 2).astype(np.float64)  # (n, n)
    return resize(big, size).astype(np.float64) / 255


def free_pixels(mask):
    """Row-major (rows, cols) of pixels whose mask value is at most 0.3 (ceil(mask - 0.3) == 0)."""
    return np.nonzero(mask <= 0.3)


def in_bounds(coord, shape):
    return 0 <= coord[0] < shape[0] and 0 <= coord[1] < shape[1]


@functools.lru_cache(maxsize=4096)
def head_struct(s, margin, angle):
    """The seed's footprint kernel: the paddle mask drawn from (n+1, n+1) of a (2n+1)^2 patch,
    n = length + margin, kept where it is exactly 1 (the original's uint8 cast)."""
    n = s.paddle_length + margin
    mask = paddle_patch(float(angle), s.paddle_length, s.paddle_thickness, margin, s.aa_scale)[1]
    return (place(mask, (2 * n + 1, 2 * n + 1), [n + 1, n + 1]) >= 1.0).astype(np.uint8)  # (2n+1, 2n+1)


@functools.lru_cache(maxsize=65536)
def circle(centre, radius, shape):
    """The pixels on the circle of `radius` around `centre` inside an image of `shape`, as the
    original finds them (one sample per pixel of arc, truncated to int, np.unique's row order),
    and their angles seen from the centre. Shapes: returns coords (m, 2) int, angles (m,)"""
    H, W = shape
    deg = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180  # (k,)
    y, x = centre[0] + radius * np.sin(deg), centre[1] + radius * np.cos(deg)  # (k,), (k,)
    inside = (y < H) & (y >= 0) & (x < W) & (x >= 0)
    flat = np.unique(y[inside].astype(int) * W + x[inside].astype(int))  # (m,)
    coords = np.stack([flat // W, flat % W], 1)  # (m, 2)
    d = coords - np.asarray(centre)  # (m, 2)
    coords.flags.writeable = False
    return coords, np.arctan2(d[:, 0], d[:, 1])


def candidates(centre, angle, radius, near, continuity):
    """Pixels on the circle of `radius` around `centre` and their probabilities: free space
    (1 - `near`, the collision mask dilated by the margin) times
    cos(min(continuity * turn, pi/2))^2; None at a dead end.
    Shapes: near (H, W) -> coords (m, 2) int, angles (m,), cmf (m,)"""
    coords, angles = circle(tuple(centre), radius, near.shape)
    if len(coords) == 0:
        return None
    turn = np.abs(angles - angle)
    turn = np.minimum(np.minimum(turn, 2 * np.pi - turn) * continuity, 0.5 * np.pi)
    pmf = (1 - near[coords[:, 0], coords[:, 1]]) * np.maximum(np.cos(turn), 0) ** 2  # (m,)
    total = pmf.sum()
    if total < 1e-4:
        return None
    return coords, angles, np.cumsum(pmf / total)


def clip_window(shape, centre, h):
    """(image window, patch window) slices of a (2h+1)^2 patch centred at `centre`."""
    top, left = centre[0] - h, centre[1] - h
    r0, r1 = max(top, 0), min(top + 2 * h, shape[0] - 1) + 1
    c0, c1 = max(left, 0), min(left + 2 * h, shape[1] - 1) + 1
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left))


@dataclass(frozen=True)
class Paddle:
    """One drawn paddle: from `start` along `angle`, brightness `contrast`, mask `margin`."""

    start: tuple
    angle: float
    contrast: float
    margin: int

    def patches(self, s):
        return paddle_patch(self.angle, s.paddle_length, s.paddle_thickness, self.margin, s.aa_scale)

    def stamp(self, image, s, which):
        """image = max(image, this paddle's line * contrast (which=0), mask (1) or near (2)), in place."""
        patch = self.patches(s)[which] * (self.contrast if which == 0 else 1.0)
        win, pwin = clip_window(image.shape, self.start, patch.shape[0] // 2)
        np.maximum(image[win], patch[pwin], out=image[win])

    def collides(self, mask, s):
        """max(mask + this paddle's mask) >= 1.8: the original's test of a new paddle."""
        patch = self.patches(s)[1]
        win, pwin = clip_window(mask.shape, self.start, patch.shape[0] // 2)
        return (mask[win] + patch[pwin]).max() >= 1.8


class Occupancy:
    """The collision mask of the paddles placed so far, and `near`, the mask dilated by the
    margin (which `candidates` reads), kept in step. Shapes: mask (H, W), near (H, W)"""

    def __init__(self, mask, margin, near=None):
        self.mask, self.margin = mask, margin
        self.near = dilate(mask, disk(margin)) if near is None else near

    def copy(self):
        return Occupancy(self.mask.copy(), self.margin, self.near.copy())

    def add(self, paddle, s):
        """Put `paddle`'s mask into the collision mask and update `near` around it."""
        paddle.stamp(self.mask, s, 1)
        (H, W), m = self.mask.shape, self.margin
        h = paddle.patches(s)[1].shape[0] // 2
        if h <= paddle.start[0] < H - h and h <= paddle.start[1] < W - h:
            paddle.stamp(self.near, s, 2)  # dilation distributes over max
            return
        (rows, cols), _ = clip_window(self.mask.shape, paddle.start, h + m)  # where near changes
        (rows2, cols2), _ = clip_window(self.mask.shape, paddle.start, h + 2 * m)  # what it depends on
        local = dilate(self.mask[rows2, cols2], disk(m))
        self.near[rows, cols] = local[rows.start - rows2.start:rows.stop - rows2.start,
                                      cols.start - cols2.start:cols.stop - cols2.start]
