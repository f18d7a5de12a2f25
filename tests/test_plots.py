"""Pictures a reader can read: MB ticks written as numbers, whole rounds, short file names."""

from __future__ import annotations

from core.plots import log_axis, plot_file_name, pyplot, round_axis


def test_traffic_ticks_are_plain_megabytes_and_rounds_whole_numbers():
    plt = pyplot()
    figure, (by_round, by_traffic) = plt.subplots(1, 2)
    by_round.plot([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], range(10))
    round_axis(by_round, xlabel="round")
    by_traffic.plot([0.0, 0.3, 1.2, 4.5, 30.0, 120.0], range(6))
    log_axis(by_traffic, xlabel="MB")
    figure.canvas.draw()
    labels = [t.get_text() for t in by_traffic.get_xticklabels() if t.get_text()]
    visible = [float(x) for x in labels if 0.3 <= float(x) <= 120]
    assert len(visible) >= 5  # e.g. 0.5 1 2 5 10 20 50 100: more than one decade mark
    assert all("10^" not in x and "$" not in x for x in labels)
    ticks = [t for t in by_round.get_xticks() if 0 <= t <= 9]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(figure)


def test_plot_file_names_are_short_and_tell_settings_apart():
    long_a = (
        "dataset=fmnist",
        "model=cnn4-fedbat",
        "partitioner=dirichlet",
        "dirichlet-alpha=0.3",
        "dirichlet-min-size=10",
        "dirichlet-self-balancing=True",
        "local-epochs=2",
    )
    long_b = long_a[:-1] + ("local-epochs=5",)
    assert plot_file_name(("dataset=fmnist", "partitioner=iid")) == "fmnist_iid"
    names = {plot_file_name(long_a), plot_file_name(long_b)}
    assert len(names) == 2 and all(len(n) <= 40 for n in names)
    assert all("=" not in n and "/" not in n for n in names)
