"""Where a traced step's device time went: kernels summed by name and kind from a Perfetto trace."""
import gzip
import json

import pytest

from bbu_jax.perf import kernel_times


def _trace(tmp_path, events):
    path = tmp_path / "plugins" / "profile" / "run" / "host.perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def _meta(kind, pid, name, tid=0):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def test_gpu_kernels_on_streams_by_name_kind_and_busy_time(tmp_path):
    """A GPU trace: the kernels on the stream threads count; the "XLA Ops" line restating them and
    the host's events do not; two streams overlapping count once in the busy time."""
    events = [_meta("process_name", 1, "/device:GPU:0"), _meta("thread_name", 1, "Stream #13(Compute)", 13),
              _meta("thread_name", 1, "Stream #14(Compute)", 14), _meta("thread_name", 1, "XLA Ops", 99),
              _meta("process_name", 2, "/host:CPU"), _meta("thread_name", 2, "python", 1),
              {"ph": "X", "pid": 1, "tid": 13, "name": "nvjet_hsh_256x128_gemm", "ts": 0, "dur": 600},
              {"ph": "X", "pid": 1, "tid": 13, "name": "segment_flash_forward", "ts": 600, "dur": 300},
              {"ph": "X", "pid": 1, "tid": 14, "name": "loop_add_fusion", "ts": 500, "dur": 200},
              {"ph": "X", "pid": 1, "tid": 13, "name": "nvjet_hsh_256x128_gemm", "ts": 1000, "dur": 100},
              {"ph": "X", "pid": 1, "tid": 99, "name": "fusion.1", "ts": 0, "dur": 1100},
              {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 2000}]
    path = _trace(tmp_path, events)
    assert kernel_times.trace_file(tmp_path) == path
    where, totals, busy = kernel_times.kernel_times(path)
    assert where == "/device:GPU:0"
    assert totals == {"nvjet_hsh_256x128_gemm": 700, "segment_flash_forward": 300, "loop_add_fusion": 200}
    assert busy == 1000  # 0-900 and 1000-1100; the fusion on the other stream lies inside
    lines = kernel_times.summary_lines(path, wall_s=0.002)
    assert lines[0].startswith("kernels on /device:GPU:0: busy 1.0 ms of the step's 2.0 ms (50%)")
    assert lines[1] == "  by kind: matmul 0.7 ms (58%), attention 0.3 ms (25%), fusion 0.2 ms (17%)"
    assert "segment_flash_forward" in lines[3]


def test_consecutive_kernels_whose_timestamps_overlap_both_count(tmp_path):
    """A stream's next kernel may be stamped as starting up to microseconds before the previous one
    ends (timestamp skew, seen in H200 traces): it follows that kernel, not inside it."""
    events = [_meta("process_name", 1, "/device:GPU:0"), _meta("thread_name", 1, "Stream #14(Compute)", 14),
              {"ph": "X", "pid": 1, "tid": 14, "name": "gemm_fusion_dot_general_466", "ts": 0.0, "dur": 88.8},
              {"ph": "X", "pid": 1, "tid": 14, "name": "loop_dynamic_update_slice_fusion_10", "ts": 86.2, "dur": 10.0},
              {"ph": "X", "pid": 1, "tid": 14, "name": "memcpy128", "ts": 96.2, "dur": 31.9}]
    _, totals, busy = kernel_times.kernel_times(_trace(tmp_path, events))
    assert totals == pytest.approx({"gemm_fusion_dot_general_466": 88.8, "loop_dynamic_update_slice_fusion_10": 10.0,
                                    "memcpy128": 31.9})
    assert busy == pytest.approx(128.1)


def test_cpu_thunks_count_their_innermost_events(tmp_path):
    """The CPU client nests fusions inside thunks on one thread: only the innermost events count."""
    events = [_meta("process_name", 1, "/host:CPU"), _meta("thread_name", 1, "tf_XLACpu/1", 5),
              {"ph": "X", "pid": 1, "tid": 5, "name": "ThunkExecutor::Execute", "ts": 0, "dur": 100},
              {"ph": "X", "pid": 1, "tid": 5, "name": "dot_fusion", "ts": 10, "dur": 30},
              {"ph": "X", "pid": 1, "tid": 5, "name": "end: dot_fusion", "ts": 40, "dur": 0},
              {"ph": "X", "pid": 1, "tid": 5, "name": "copy.3", "ts": 50, "dur": 20}]
    where, totals, busy = kernel_times.kernel_times(_trace(tmp_path, events))
    assert where == "host threads of XLA's CPU client"
    assert totals == {"dot_fusion": 30, "copy.3": 20} and busy == 50


def test_no_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        kernel_times.trace_file(tmp_path)
