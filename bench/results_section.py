"""One section of bench/RESULTS.md that a benchmark script owns, between its two marker lines."""


def write_section(path, begin, end, lines):
    """Replaces the text from `begin` to `end` in `path` with `lines` (which start with `begin`
    and end with `end`), or appends them when the file has no such section yet; prints them."""
    try:
        old = open(path).read()
    except FileNotFoundError:
        old = ""
    first, last = old.find(begin), old.find(end)
    if first >= 0 and last > first:
        new = old[:first] + "\n".join(lines) + old[last + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    open(path, "w").write(new)
    print("\n".join(lines))
