"""What the tests' child processes report about Numba's compiles (shared by
test_first_call.py and test_precompile.py)."""

# what a child process reports: the functions Numba compiled in it, and what it did for each
# kernel (kernel.EVENTS)
COMPILE_REPORT = (
    "import json\n"
    "from numba.core import event\n"
    "class Compiles(event.Listener):\n"
    "    names = []\n"
    "    def on_start(self, ev):\n"
    "        self.names.append(ev.data['dispatcher'].py_func.__name__)\n"
    "    def on_end(self, ev):\n"
    "        pass\n"
    "event.register('numba:compile', Compiles())\n"
    "from videoanchor.anchor.solvers import _workset_kernel as k\n"
    "def report(**extra):\n"
    "    print(json.dumps({'compiled': sorted(set(Compiles.names)), 'events': k.EVENTS, **extra}))\n"
)
