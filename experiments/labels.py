"""Names beside the points of a scatter plot, placed clear of each other, of the other markers and of the frame."""
from __future__ import annotations


def place_labels(fig, ax, points: list[tuple[str, tuple, tuple]], unnamed: list[tuple] = ()) -> None:
    """Name each point beside it, at the first of eight offsets (then the same at two, three and four times the
    distance, with a line to the point) whose text overlaps no label already placed, no other marker and not the
    frame's edge (else the offset that does least harm), so a crowded cluster stays readable. unnamed: the other
    markers drawn there, to keep clear of too. A legend already drawn inside the axes is kept clear of as a label is
    (draw it first: where loc="best" puts it depends on the points, not on the labels)."""
    from matplotlib.colors import to_rgb
    from matplotlib.transforms import ScaledTranslation
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [ax.transData.transform(xy) for xy in [p[1] for p in points] + list(unnamed)]
    legend = ax.get_legend()
    boxes = [legend.get_window_extent(renderer)] if legend is not None else []
    near = [(6, 3), (6, -3), (-6, 3), (-6, -3), (0, 7), (0, -7), (12, 0), (-12, 0)]
    offsets = [(x * f, y * f) for f in (1, 2, 3, 4) for x, y in near]  # farther out, with a line to the point

    def cost(bb, own):
        c = sum(1e3 for b in boxes if bb.overlaps(b))
        outside = bb.x0 < frame.x0 or bb.x1 > frame.x1 or bb.y0 < frame.y0 or bb.y1 > frame.y1
        return c + 1e4 * outside + sum(100 for k, (x, y) in enumerate(marks) if k != own and bb.x0 - 5 < x < bb.x1 + 5
                       and bb.y0 - 5 < y < bb.y1 + 5)
    for k, (name, xy, color) in enumerate(points):
        color = tuple(0.7 * c for c in to_rgb(color))  # the marker's colour, darker: a pale one stays legible as text
        best = None
        for off in offsets:
            ha = "left" if off[0] > 0 else "right" if off[0] < 0 else "center"
            shift = ScaledTranslation(off[0] / 72, off[1] / 72, fig.dpi_scale_trans)  # in points, as annotate's
            t = ax.text(*xy, name, ha=ha, va="bottom" if off[1] >= 0 else "top", fontsize=7, color=color,
                        transform=ax.transData + shift)
            bb = t.get_window_extent(renderer)
            c = cost(bb, k)
            if best is None or c < best[0]:
                if best:
                    best[1].remove()
                best = (c, t, bb, off)
            else:
                t.remove()
            if c == 0:
                break
        boxes.append(best[2])
        if best[3] not in near:  # far from its point: a line to it
            ax.annotate("", xy, xytext=best[3], textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "shrinkA": 0, "shrinkB": 4})
