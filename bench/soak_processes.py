"""The server's processes as /proc shows them, for bench/serve_soak.py and bench/serve_load.py.

A module of its own to keep serve_soak.py under 500 lines: it names every process under the
server's main process (main, LitServe's manager and HTTP process, each engine worker) with its
RSS, reads their CPU time (serve_load reports each process's share of a core over its timed
run), and checks that a pid is a descendant of the server before that pid is killed.
"""

from __future__ import annotations

import os


def _stat_fields():
    """(pid, the fields of /proc/<pid>/stat after the command name) for every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                yield int(entry), f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, command line) for every process."""
    table = {}
    for pid, fields in _stat_fields():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[pid] = (int(fields[1]), int(fields[19]), cmd)
    return table


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def server_processes(root: int, worker_pids: dict[int, int]) -> list[dict]:
    """Every process under the server's main process, named: main; LitServe's manager and HTTP
    process (forked from main with its command line: the manager starts first); worker<i>
    (`worker_pids` maps pid -> worker index, from /stats); multiprocessing's resource tracker."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = [{"name": "main", "pid": root}]
    forked = sorted(
        (p for p in children.get(root, []) if table[p][2] == table.get(root, (0, 0, ""))[2]), key=lambda p: table[p][1]
    )
    for pid in sorted(children.get(root, []), key=lambda p: table[p][1]):
        cmd = table[pid][2]
        if pid in worker_pids:
            name = f"worker{worker_pids[pid]}"
        elif "resource_tracker" in cmd:
            name = "resource_tracker"
        elif pid in forked:
            name = "manager" if pid == forked[0] and len(forked) > 1 else "http"
        else:
            name = "other"
        out.append({"name": name, "pid": pid})
    seen = {p["pid"] for p in out}
    stack = [p for p in seen if p != root]
    while stack:  # anything deeper (none expected)
        parent = stack.pop()
        for pid in children.get(parent, []):
            if pid not in seen:
                seen.add(pid)
                stack.append(pid)
                out.append({"name": "descendant", "pid": pid})
    for p in out:
        rss = _rss_kib(p["pid"])
        p["rss_mib"] = None if rss is None else round(rss / 1024, 1)
    return out


def tree_cpu_seconds(root: int) -> dict[int, float]:
    """pid -> CPU seconds so far (user + system, /proc/<pid>/stat) of `root` and every
    descendant; {} where there is no /proc (not Linux)."""
    if not os.path.isdir("/proc"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    stats = {pid: (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick) for pid, fields in _stat_fields()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid][1]
            todo += children.get(pid, [])
    return out


def is_descendant(pid: int, root: int) -> bool:
    table = _proc_table()
    for _ in range(64):
        if pid not in table:
            return False
        pid = table[pid][0]
        if pid == root:
            return True
    return False
