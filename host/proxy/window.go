package proxy

import "sync/atomic"

// inflow is the receive side of one HTTP/2 flow-control window (a stream's
// or a connection's): how much the peer may still send, and the credit the
// proxy owes it for bytes it has consumed, returned in batches of a
// quarter window (as grpc-go and x/net do) so that small frames do not
// each cost a WINDOW_UPDATE. Safe for concurrent use: the peer's reader
// takes, whoever consumes the bytes gives back.
type inflow struct {
	size  int64        // the window
	avail atomic.Int64 // what the peer may still send
	owed  atomic.Int64 // consumed and not yet returned
}

func newInflow(size int64) *inflow {
	w := &inflow{size: size}
	w.avail.Store(size)
	return w
}

// reset starts the window over (a stream relaunched on another
// connection).
func (w *inflow) reset() {
	w.avail.Store(w.size)
	w.owed.Store(0)
}

// take records n bytes the peer sent; false: it sent more than the window
// allowed (a flow-control error).
func (w *inflow) take(n uint32) bool { return w.avail.Add(-int64(n)) >= 0 }

// give records n bytes consumed and returns the credit to send back now
// (0: not yet, the batch is not full).
func (w *inflow) give(n int) uint32 {
	if n <= 0 {
		return 0
	}
	owed := w.owed.Add(int64(n))
	if owed < w.size/4 || !w.owed.CompareAndSwap(owed, 0) {
		return 0
	}
	w.avail.Add(owed)
	return uint32(owed)
}
