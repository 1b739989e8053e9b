package proxy

import (
	"container/heap"
	"sync"
	"time"
)

// deadlines holds the deadlines of one client connection's calls, with
// one timer for all of them. Arming a timer can wake another thread (the
// runtime's poller must learn of an earlier wake-up), so a timer per call
// costs a thread wake-up on the path of every call; here the timer is
// armed again only for a deadline earlier than the one it waits for, and
// calls that end do not touch it. When it fires it expires what is due
// and waits for the earliest deadline left.
type deadlines struct {
	mu    sync.Mutex
	h     callHeap
	timer *time.Timer
	at    time.Time // when the timer fires; zero: not armed
	done  bool      // the connection ended: no more calls, no timer
}

// add watches c.deadline (set, and not changed after).
func (d *deadlines) add(c *call) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.done {
		return
	}
	heap.Push(&d.h, c)
	if d.at.IsZero() || c.deadline.Before(d.at) {
		d.armLocked(c.deadline)
	}
}

// remove forgets c (it ended). The timer stays as it is: if it fires for
// nothing, it waits for the next deadline then.
func (d *deadlines) remove(c *call) {
	d.mu.Lock()
	if c.dlIndex >= 0 {
		heap.Remove(&d.h, c.dlIndex)
	}
	d.mu.Unlock()
}

// stop ends the timer: the connection is over and its calls are gone.
func (d *deadlines) stop() {
	d.mu.Lock()
	d.done = true
	if d.timer != nil {
		d.timer.Stop()
	}
	d.at = time.Time{}
	d.mu.Unlock()
}

func (d *deadlines) armLocked(at time.Time) {
	d.at = at
	wait := time.Until(at)
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
	} else {
		d.timer.Reset(wait)
	}
}

// fire expires the calls that are due and re-arms for the next.
func (d *deadlines) fire() {
	now := time.Now()
	var due []*call
	d.mu.Lock()
	for len(d.h) > 0 && !d.h[0].deadline.After(now) {
		due = append(due, heap.Pop(&d.h).(*call))
	}
	d.at = time.Time{}
	if len(d.h) > 0 && !d.done {
		d.armLocked(d.h[0].deadline)
	}
	d.mu.Unlock()
	for _, c := range due {
		c.expire()
	}
}

// callHeap orders calls by deadline (container/heap); each call knows its
// index (dlIndex, -1 when out of the heap).
type callHeap []*call

func (h callHeap) Len() int           { return len(h) }
func (h callHeap) Less(i, j int) bool { return h[i].deadline.Before(h[j].deadline) }
func (h callHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].dlIndex, h[j].dlIndex = i, j
}

func (h *callHeap) Push(x any) {
	c := x.(*call)
	c.dlIndex = len(*h)
	*h = append(*h, c)
}

func (h *callHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.dlIndex = -1
	return c
}
