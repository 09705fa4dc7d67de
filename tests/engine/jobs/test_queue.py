"""Waiting jobs: first come, first served, each told its place and an estimate while another job runs."""
import threading
import time

from engine import Engine

REQ = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1}


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_waiting_jobs_know_their_place_and_run_in_arrival_order():
    engine = Engine(runtime="pytorch")
    engine.load("builtin:tiny")
    engine.txt2img(REQ)  # one finished txt2img: the estimate has something to go by
    release, order = threading.Event(), []

    def blocking(step, total):
        release.wait(60)

    def job(name, call):
        def run():
            call()
            order.append(name)
        thread = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    running = job("running", lambda: engine.txt2img(REQ, progress=blocking))
    wait_until(lambda: engine.live().running)
    second = job("second", lambda: engine.txt2img({**REQ, "seed": 2}))
    wait_until(lambda: engine.queue_place(second.ident) is not None)
    third = job("third", lambda: engine.hires_fix({**REQ, "factor": 1.5}))
    wait_until(lambda: engine.queue_place(third.ident) is not None)

    first_place, third_place = engine.queue_place(second.ident), engine.queue_place(third.ident)
    assert (first_place.place, first_place.ahead) == (1, ["txt2img"])
    assert (third_place.place, third_place.ahead) == (2, ["txt2img", "txt2img"])
    assert first_place.wait_s is not None and third_place.wait_s > first_place.wait_s
    assert engine.queue_place(running.ident) is None  # it runs, it does not wait
    fourth = job("fourth", lambda: engine.txt2img({**REQ, "seed": 4}))
    wait_until(lambda: engine.queue_place(fourth.ident) is not None)
    # no hires fix has finished here yet: its time is unknown, so is the wait behind it
    assert engine.queue_place(fourth.ident).wait_s is None
    release.set()
    for thread in (running, second, third, fourth):
        thread.join(120)
    assert order == ["running", "second", "third", "fourth"]
    assert engine.queue_place(second.ident) is None
