package bench

import (
	"fmt"
	"sync"
	"time"
)

// progressInterval is how often the live progress line is rewritten.
const progressInterval = time.Second

// startProgress rewrites one status line on Options.Progress about once a
// second until the returned func is called, which erases the line.
func (r *run) startProgress() (stop func()) {
	w := r.opt.Progress
	if w == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(progressInterval)
		defer t.Stop()
		var lastDone int64
		last := r.t0
		for {
			select {
			case <-done:
				fmt.Fprint(w, "\r\x1b[K")
				return
			case now := <-t.C:
				var calls, failed int64
				for _, s := range r.shards {
					s.mu.Lock()
					calls += s.done
					failed += s.failed
					s.mu.Unlock()
				}
				rate := float64(calls-lastDone) / now.Sub(last).Seconds()
				lastDone, last = calls, now
				fmt.Fprintf(w, "\r\x1b[K%s%s %s: %s  calls %s  %s calls/s  errors %s",
					r.opt.Round, r.opt.Name, r.phase(now), fmtDur(now.Sub(r.t0).Round(100*time.Millisecond)),
					formatCount(float64(calls)), formatCount(rate), formatCount(float64(failed)))
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}

func (r *run) phase(now time.Time) string {
	if now.Before(r.measureStart) {
		return "warm-up"
	}
	return "measuring"
}
