"""The Gunicorn internals the kit leans on, checked so an upgrade fails here, loudly, first.

pyproject pins ``gunicorn>=27,<28``; before widening that, make these pass on the new version.
"""

from __future__ import annotations

import inspect
import socket

from gunicorn import arbiter, sock, util
from gunicorn.config import Config
from gunicorn.http import message, wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.workers import base, sync

from workers import gunicorn_internals as internals


def source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_reaping_goes_through_the_arbiter_modules_os() -> None:
    """``ExitStatuses`` reads exit statuses by standing in for ``gunicorn.arbiter.os``."""
    assert arbiter.os.__name__ == "os" or isinstance(arbiter.os, internals.ExitStatuses)
    reap = source(arbiter.Arbiter.reap_workers)
    assert "os.waitpid(-1, os.WNOHANG)" in reap
    assert reap.index("os.waitpid") < reap.index("self.cfg.child_exit(self, worker)")


def test_scale_down_retires_the_lowest_age_first() -> None:
    """``retire_first`` points the scale-down at the highest ids by lowering their age."""
    manage = source(arbiter.Arbiter.manage_workers)
    assert "key=lambda w: w[1].age" in manage and "workers.pop(0)" in manage


def test_the_num_workers_setter_calls_nworkers_changed() -> None:
    assert "nworkers_changed" in source(arbiter.Arbiter._set_num_workers)


def test_the_first_worker_count_is_set_before_the_app_is_preloaded() -> None:
    """The hooks set the native thread variables and the metrics directory in the first
    ``nworkers_changed``, which must come before ``preload_app`` imports the app."""
    setup = source(arbiter.Arbiter.setup)
    assert setup.index("self.num_workers = self.cfg.workers") < setup.index("self.app.wsgi()")


def test_error_answers_are_written_by_util_write_error() -> None:
    """``answer_errors_with`` swaps ``util.write_error`` for a JSON writer."""
    assert "util.write_error(client, status_int, reason, mesg)" in source(base.Worker.handle_error)
    assert inspect.signature(util.write_error).parameters.keys() == {
        "sock",
        "status_int",
        "reason",
        "mesg",
    }


def test_a_timeout_abort_is_caught_by_the_request_error_handler() -> None:
    """workers/heavy.py re-raises the timeout's exit code after Gunicorn's handler caught it."""
    assert "sys.exit(1)" in source(base.Worker.handle_abort)
    assert "except BaseException as e:" in source(sync.SyncWorker.handle)


def test_a_worker_gets_half_the_timeout_as_its_heartbeat_period() -> None:
    """workers/heavy.py keeps the head wait below ``worker.timeout``."""
    assert "self.timeout / 2.0" in source(arbiter.Arbiter.spawn_worker)


def test_the_control_socket_is_set_up_from_cfg_after_when_ready() -> None:
    """``move_control_socket`` changes the setting in ``when_ready``, before the socket exists."""
    assert "self.cfg.when_ready(self)" in source(arbiter.Arbiter.start)
    run = source(arbiter.Arbiter.run)
    assert run.index("self.start()") < run.index("self._start_control_server()")
    assert "self.cfg.control_socket" in source(arbiter.Arbiter._get_control_socket_path)


def test_a_reexec_exports_the_old_masters_pid() -> None:
    """``is_reexec`` tells a USR2 child by the variable Gunicorn sets for it."""
    assert "GUNICORN_PID" in source(arbiter.Arbiter.reexec)


def test_exit_statuses_keep_only_workers_and_each_is_taken_once() -> None:
    """As PID 1 the master reaps orphans too: their statuses must not pile up."""

    class FakeOs:
        def __init__(self) -> None:
            self.reaped = [(41, 9), (42, 256), (0, 0)]

        def waitpid(self, pid: int, options: int) -> tuple[int, int]:
            return self.reaped.pop(0)

    statuses = internals.ExitStatuses(FakeOs(), lambda pid: pid == 42)
    assert [statuses.waitpid(-1, 0) for _ in range(3)] == [(41, 9), (42, 256), (0, 0)]
    assert statuses.statuses == {42: 256}


def test_listeners_pass_setsockopt_to_their_socket() -> None:
    """``set_listener_options`` calls ``setsockopt`` on ``Worker.sockets``' objects."""
    assert "self.sockets = sockets" in source(base.Worker.__init__)
    listener = sock.TCPSocket(("127.0.0.1", 0), Config(), Config().logger_class(Config()))
    try:
        internals.set_listener_options([listener], [(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)])
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
    finally:
        listener.close()


def test_a_listener_accepts_as_the_kits_socket_class() -> None:
    """``accept_as`` stands in for ``SyncWorker.accept``: the listener wrapper's ``sock`` and
    ``FAMILY``; the connection it gives is blocking, of the class asked for."""
    assert "listener.accept()" in source(sync.SyncWorker.accept)
    assert "self.accept(listener)" in source(sync.SyncWorker.run_for_one)

    class Mine(socket.socket):
        pass

    listener = sock.TCPSocket(("127.0.0.1", 0), Config(), Config().logger_class(Config()))
    try:
        with socket.create_connection(listener.getsockname()) as peer:
            client, addr = internals.accept_as(listener, Mine)
            with client:
                assert isinstance(client, Mine) and client.getblocking()
                assert addr == peer.getsockname() and client.family == socket.AF_INET
    finally:
        listener.close()


def test_the_sync_worker_closes_each_connection_with_util_close_graceful() -> None:
    """``close_connections_with`` replaces the module function the sync worker calls."""
    assert "util.close_graceful(client)" in source(sync.SyncWorker.handle)
    assert next(iter(inspect.signature(util.close_graceful).parameters)) == "sock"


def test_the_body_is_req_body_and_100_continue_is_sent_in_wsgi_create() -> None:
    """``take_expect_continue``, ``request_body`` and ``replace_body`` lean on these names."""
    create = source(wsgi.create)
    assert "if req._expected_100_continue:" in create
    assert '"wsgi.input": req.body' in source(wsgi.default_environ)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(
            b"POST /x HTTP/1.1\r\nHost: x\r\ncontent-length: 3\r\nExpect: 100-continue\r\n\r\nabc"
        )
        req = next(RequestParser(Config(), right, ("127.0.0.1", 1)))
        assert isinstance(req, message.Request)
        assert internals.declared_length(req) == 3
        assert internals.take_expect_continue(req) and not req._expected_100_continue
        assert internals.request_body(req).read(10) == b"abc"
        internals.replace_body(req, b"line\nrest")
        assert req.body.readline() == b"line\n" and req.body.read() == b"rest"


def test_listeners_read_their_backlog() -> None:
    """``listen_backlog``: each of a worker's ``sockets`` answers ``get_backlog`` (TCP_INFO)."""
    assert "TCP_INFO" in source(sock.TCPSocket.get_backlog)
    listener = sock.TCPSocket(("127.0.0.1", 0), Config(), Config().logger_class(Config()))
    try:
        assert internals.listen_backlog([listener]) == 0
        assert internals.listen_backlog([]) == -1
    finally:
        listener.close()


def test_the_main_loop_finds_sigterms_handler_by_name_and_halts_on_stop_iteration() -> None:
    """``stop_gracefully_with`` sets ``handle_term`` on the arbiter; the loop must look it up
    by name, and turn ``StopIteration`` into ``halt()`` (exit 0)."""
    run = source(arbiter.Arbiter.run)
    assert 'getattr(self, "handle_%s" % signame' in run
    assert "except (StopIteration, KeyboardInterrupt):\n            self.halt()" in run
    # what the drain calls while it tends the pool, and what says who else holds the socket
    for name in ("reap_workers", "murder_workers", "manage_workers", "kill_workers"):
        assert callable(getattr(arbiter.Arbiter, name))
    assert "sig = self.SIG_QUEUE.get(block=True, timeout=timeout)" in source(
        arbiter.Arbiter.wait_for_signals
    )
    assert "self.reexec_pid = 0" in source(arbiter.Arbiter.reap_workers)


def test_the_control_socket_server_unlinks_its_path_on_stop() -> None:
    """``keep_control_socket_file`` empties ``socket_path`` so ``stop`` removes nothing."""
    from gunicorn.ctl.server import ControlSocketServer

    assert "os.unlink(self.socket_path)" in source(ControlSocketServer.stop)
    assert "os.path.exists(self.socket_path)" in source(ControlSocketServer.stop)
    assert "self._control_server = None" in source(arbiter.Arbiter._stop_control_server)
