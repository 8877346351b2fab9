"""Growing Pathfinder contours and drawing whole images: a reimplementation of the curvy-contour
("snakes2") generator of Linsley, Kim, Veerabadran, Windolf, Serre (2018), "Learning long-range
spatial dependencies with horizontal gated recurrent units" (NeurIPS),
github.com/drewlinsley/pathfinder (snakes.py, snakes2.py), with the settings the Long Range Arena
(Tay et al. 2021) used for its 32x32, 64x64 and 128x128 images (lra_benchmarks/data/pathfinder.py).
Paddles, masks and pixel conventions are in `pathfinder_draw`.

The algorithm (coordinates are (row, col); angles in radians from the +col axis):
  * A paddle is a segment of `paddle_length` pixels; its mask is the segment dilated by `margin`.
    The collision mask holds the masks of the paddles placed so far.
  * Two target snakes start from two seed paddles whose tails lie `seed_distance` apart. Each
    snake then grows one paddle at a time: the next paddle's head is drawn from the pixels on a
    circle of radius paddle_length + margin around a pivot just beyond the last head, with
    probability proportional to (free space) * cos(min(continuity * |turn|, pi/2))^2, so turns
    beyond 90/continuity degrees are impossible (a continuity-weighted random walk). A paddle
    whose mask overlaps the collision mask (sum >= 1.8) is redrawn (max_paddle_retrial more
    times), else the pair is thrown away and drawn anew. Each target has `contour_length` paddles.
  * Distractor snakes of `distractor_length` paddles are grown the same way from seeds placed
    where their footprint is free (a snake that fails is dropped).
  * Two circular markers of `marker_radius`: one on the tail of one target; the other on the
    last head of the same target (label 1) or of the other target (label 0).
  * The float image (paddle contrast times snake contrast; markers 1.0) is scaled to uint8 by
    its maximum, as scipy.misc.imsave did.

Kept from the Python 2 original: integer divisions (distractor_length = contour_length // 3,
n_distractors = K // distractor_length), ceil rounding of translated coordinates, truncation of
circle samples, the 0.3 and 1.8 thresholds, and two quirks: the first target's last paddle never
enters the collision mask, and each target's newest paddle is not yet in it when the other
target grows. Different contours may therefore touch (docs/data/pathfinder.md gives measured
rates). The order of random draws differs (one numpy Generator per chunk of images).
"""
import functools
from dataclasses import dataclass

import numpy as np

from diagssm.tasks.pathfinder_draw import (Occupancy, Paddle, bytescale, candidates, clip_window, dilate, flip,
                                           free_pixels, head_struct, in_bounds, marker, translate)

MAX_PAIR_ATTEMPTS = 100_000  # the original retries the target pair forever


@dataclass
class Snake:
    """A contour being grown: its paddles in path order (the newest is not yet in the collision
    mask), the pivot and angle the next paddle grows from, and its two ends (row, col)."""

    paddles: list
    pivot: list
    angle: float
    tail: list
    head: list


def pick(values, rng):
    """One of `values` at random (no draw for a single value)."""
    return values[0] if len(values) == 1 else values[int(rng.integers(len(values)))]


def random_angle(rng):
    return int(rng.integers(-180, 180)) * np.pi / 180


def extend(snake, occ, s, margin, contrast, rng):
    """Grow `snake` by one paddle (snakes.extend_snake); False at a dead end or after
    max_paddle_retrial + 1 colliding draws. On success the snake's previous paddle enters the
    Occupancy `occ` (in place)."""
    pivot = translate(snake.pivot, snake.angle, s.paddle_length + 2 * margin)
    found = candidates(pivot, snake.angle, s.paddle_length + margin, occ.near, s.continuity)
    if found is None:
        return False
    coords, angles, cmf = found
    for _ in range(s.max_paddle_retrial + 1):
        k = int(np.argmax(cmf > rng.random()))
        paddle = Paddle((int(coords[k, 0]), int(coords[k, 1])), float(flip(angles[k])), contrast, margin)
        if not paddle.collides(occ.mask, s):
            occ.add(snake.paddles[-1], s)
            snake.paddles.append(paddle)
            snake.pivot, snake.angle, snake.head = pivot, float(angles[k]), list(paddle.start)
            return True
    return False


def seed_at(shape, tail, s, margin, angle, contrast):
    """A one-paddle snake from `tail` along `angle`; None if its head or pivot is outside."""
    head = translate(tail, angle, s.paddle_length)
    pivot = translate(head, flip(angle), s.paddle_length + margin)
    if not (in_bounds(head, shape) and in_bounds(pivot, shape)):
        return None
    return Snake([Paddle(tuple(tail), float(angle), contrast, margin)], pivot, float(angle), list(tail), list(tail))


def seed_in(mask, blocked, s, margin, contrast, rng):
    """A seed paddle with a random angle and its tail on a random pixel where its footprint
    misses `blocked` (snakes.seed_snake); (snake or None, whether to stop trying)."""
    angle = random_angle(rng)
    rows, cols = free_pixels(dilate(blocked, head_struct(s, margin, angle)))
    if len(rows) == 0:
        return None, True
    k = int(rng.integers(len(rows)))
    return seed_at(mask.shape, [int(rows[k]), int(cols[k])], s, margin, angle, contrast), False


def distractor(occ, s, margin, rng, stop_with_availability=0.01):
    """snakes.make_snake: a distractor of distractor_length paddles; (snake, new Occupancy) or None."""
    mask = occ.mask
    lined = mask.copy()
    lined[0, :] = lined[-1, :] = lined[:, 0] = lined[:, -1] = 1
    for _ in range(s.max_paddle_retrial + 1):
        if len(free_pixels(mask)[0]) / mask.size < stop_with_availability:
            return None
        snake, stop = seed_in(mask, lined, s, margin, pick(s.snake_contrast, rng), rng)
        if snake is not None or stop:
            break
    if snake is None:
        return None
    occ = occ.copy()
    for _ in range(s.distractor_length - 1):
        if not extend(snake, occ, s, margin, pick(s.snake_contrast, rng), rng):
            return None
    occ.add(snake.paddles[-1], s)
    return snake, occ


@functools.lru_cache(maxsize=16)
def empty_occupancy(s, margin):
    """The collision mask before any paddle (1 on a border of `padding` pixels) and, blocked
    further, the border of 2 * seed_distance pixels where the first seed's footprint may not go."""
    n, d, pad = s.window, 2 * s.seed_distance, s.padding
    mask = np.zeros((n, n))
    mask[:pad, :] = mask[-pad:, :] = mask[:, :pad] = mask[:, -pad:] = 1
    lined = mask.copy()
    lined[:d, :] = lined[n - d:, :] = lined[:, :d] = lined[:, n - d:] = 1
    return Occupancy(mask, margin), lined


def seed_pair(s, margin, mu, rng):
    """snakes2.initialize_two_seeds: two seed paddles with tails seed_distance apart, the first
    at least 2 * seed_distance from the borders. Returns ([Snake, Snake], Occupancy) or None."""
    empty, lined = empty_occupancy(s, margin)
    mask = empty.mask
    for _ in range(s.max_paddle_retrial + 1):
        first, stop = seed_in(mask, lined, s, margin, pick(s.paddle_contrast, rng) * mu[0], rng)
        if first is not None or stop:
            break
    if first is None:
        return None
    contrast = pick(s.paddle_contrast, rng) * mu[1]
    for _ in range(s.max_paddle_retrial + 1):
        angle, phi = random_angle(rng), int(rng.integers(0, 360)) * np.pi / 180
        tail = [int(np.round(first.tail[0] + s.seed_distance * np.sin(phi))),
                int(np.round(first.tail[1] + s.seed_distance * np.cos(phi)))]
        second = seed_at(mask.shape, tail, s, margin, angle, contrast)
        if second is not None:
            return [first, second], empty.copy()
    return None


def target_pair(s, margin, rng):
    """snakes2.two_snakes: both targets grown paddle by paddle, alternately, to contour_length
    paddles. Returns ([Snake, Snake], Occupancy) or None."""
    mu = list(s.snake_contrast) * 2
    rng.shuffle(mu)
    seeded = seed_pair(s, margin, mu, rng)
    if seeded is None:
        return None
    snakes, occ = seeded
    for _ in range(s.contour_length - 1):
        contrast = pick(s.paddle_contrast, rng)
        for k, snake in enumerate(snakes):
            if not extend(snake, occ, s, margin, contrast * mu[k], rng):
                return None
    occ.add(snakes[1].paddles[-1], s)  # the original adds only the second's last paddle
    return snakes, occ


def draw_example(s, label, rng):
    """One Pathfinder image with `label` (1: the markers end the same target, 0: different ones).

    Returns a dict: image (n, n) uint8; label; ids (n, n) uint8, which contour gives each pixel
    its ink (0 none, 1 and 2 the targets, 3.. the distractors); ends (2, 2) int, the marker
    centres (row, col); contours (2,), the target each marker sits on (1 or 2); margin; snakes.
    """
    margin = pick(s.margins, rng)
    for _ in range(MAX_PAIR_ATTEMPTS):
        pair = target_pair(s, margin, rng)
        if pair is not None:
            break
    else:
        raise RuntimeError(f"no target pair after {MAX_PAIR_ATTEMPTS} attempts with {s}")
    targets, occ = pair
    snakes = list(targets)
    for _ in range(s.n_distractors):
        for _ in range(s.max_distractor_retrial + 1):
            got = distractor(occ, s, margin, rng)
            if got is not None:
                snakes.append(got[0])
                occ = got[1]
                break
    ink, ids = render(snakes, (s.window, s.window), s)
    first = int(rng.integers(0, 2))
    second = first if label else 1 - first
    ends = np.array([targets[first].tail, targets[second].head])  # (2, 2)
    dots = np.maximum(*(marker(s.window, e, s.marker_radius, s.aa_scale) for e in ends))  # (n, n)
    return dict(image=bytescale(np.maximum(ink, dots)), label=int(label), ids=ids, ends=ends,
                contours=np.array([first + 1, second + 1]), margin=margin, snakes=snakes)


def render(snakes, shape, s):
    """The brightest ink per pixel over all paddles, and the (1-based) snake that gives it.
    Shapes: returns ink (H, W) float, ids (H, W) uint8"""
    ink, ids = np.zeros(shape), np.zeros(shape, dtype=np.uint8)
    for k, snake in enumerate(snakes):
        for paddle in snake.paddles:
            line = paddle.patches(s)[0] * paddle.contrast
            win, pwin = clip_window(shape, paddle.start, line.shape[0] // 2)
            brighter = line[pwin] > ink[win]
            ink[win][brighter], ids[win][brighter] = line[pwin][brighter], k + 1
    return ink, ids


# ---------------------------------------------------------------- inspecting a drawn contour

def contour_ink(snake, s, shape):
    """The ink of one contour alone (its paddles, contrast 1). Shapes: returns (H, W) float"""
    ink = np.zeros(shape)
    for paddle in snake.paddles:
        line = paddle.patches(s)[0]
        win, pwin = clip_window(shape, paddle.start, line.shape[0] // 2)
        np.maximum(ink[win], line[pwin], out=ink[win])
    return ink


def contour_path(snake, s):
    """The contour's centre line with its dashes joined: the paddles' end points in path order,
    from the tail (first marker position) to the head (last paddle's start).
    Shapes: returns (2 * n_paddles, 2) float (row, col)"""
    points = []
    for k, paddle in enumerate(snake.paddles):
        start = np.asarray(paddle.start, dtype=float)
        end = start + s.paddle_length * np.array([np.sin(paddle.angle), np.cos(paddle.angle)])
        points += [start, end] if k == 0 else [end, start]  # grown paddles point back to the pivot
    return np.array(points)
