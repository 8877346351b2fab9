"""`diagssm data show` for the memory tasks (`diagssm.tasks.memory`): a few test examples as
text (runs of a repeated token written `tok*count`) and a picture of one example's input and target.
"""
import torch

N_SHOW = 3
MAX_ITEMS = 40


def token_runs(tokens):
    """Tokens as text, runs of 3 or more equal tokens written `tok*count`; long texts keep their
    first and last MAX_ITEMS/2 items. E.g. [5, 0, 0, 0, 0, 9] -> "5 0*4 9"."""
    tokens = [int(t) for t in tokens]
    items, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        items += [f"{tokens[i]}*{j - i}"] if j - i >= 3 else [str(tokens[i])] * (j - i)
        i = j
    if len(items) > MAX_ITEMS:
        half = MAX_ITEMS // 2
        items = items[:half] + [f"... ({len(items) - MAX_ITEMS} items) ..."] + items[-half:]
    return " ".join(items)


def _answer(task, y):
    """The scored part of a target as text: y[score_start:] for per-step tasks, else the class id
    (for assoc_recall also the value's input id, n_keys + class). Shapes: y (L,) or ()"""
    if task.head == "per_step":
        return token_runs(y[task.score_start:])
    if task.name == "assoc_recall":
        return f"class {int(y)} (input id {task.params['n_keys'] + int(y)})"
    return f"class {int(y)}"


def show_tokens(task, png_path):
    """Text of N_SHOW test examples of a token task, and a picture of the first one."""
    lines = [f"{task.name}: {len(task.train)}/{len(task.val)}/{len(task.test)} sequences, d_input={task.d_input} "
             f"ids, d_output={task.d_output} classes, scored: "
             + (f"steps t >= {task.score_start}" if task.head == "per_step" else "the last step")]
    for i in range(min(N_SHOW, len(task.test))):
        x, y = task.test[i][:2]
        lines += [f"  x[{i}] ({len(x)} steps): {token_runs(x)}", f"  answer: {_answer(task, y)}"]
    _draw_tokens(task, *task.test[0][:2], png_path)
    return "\n".join(lines)


def _draw_tokens(task, x, y, png_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
    t = torch.arange(len(x))  # (L,)
    ax[0].scatter(t, x, s=4, c="tab:blue")
    ax[0].set_ylabel("input id")
    if task.head == "per_step":
        ax[1].scatter(t[task.score_start:], y[task.score_start:], s=8, c="tab:red")
        ax[1].set_title(f"target on the scored steps t >= {task.score_start}", fontsize=9)
    else:
        ax[1].scatter([len(x) - 1], [int(y)], s=30, c="tab:red")
        ax[1].set_title(f"answer at the last step: class {int(y)}", fontsize=9)
    ax[1].set_ylabel("target id")
    ax[1].set_xlabel("step")
    fig.suptitle(f"{task.name}: one test example", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def show_adding(task, png_path):
    """Text of N_SHOW test examples of the adding problem (marker positions, marked values, target)
    and a picture of the first one."""
    lines = [f"{task.name}: {len(task.train)}/{len(task.val)}/{len(task.test)} sequences of "
             f"{task.test.values.shape[1]} steps; x = (value, marker), y = sum of the 2 marked values"]
    for i in range(min(N_SHOW, len(task.test))):
        values, marks = task.test.values[i], task.test.marks[i]  # (L,), (2,)
        a, b = marks.tolist()
        lines.append(f"  [{i}] marks at {a} ({values[a]:.3f}) and {b} ({values[b]:.3f}): "
                     f"y = {float(task.test.y[i]):.3f}")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    values, marks = task.test.values[0], task.test.marks[0]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(values, lw=0.3, c="0.6", label="value")
    ax.scatter(marks, values[marks], c="tab:red", zorder=3, label="marked")
    ax.axvline(len(values) // 2, ls=":", c="k", lw=0.8)
    ax.set_title(f"adding: y = {values[marks[0]]:.3f} + {values[marks[1]]:.3f} = {float(task.test.y[0]):.3f}",
                 fontsize=10)
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return "\n".join(lines)
