package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// L4Relay is the baseline any proxy is measured against
// (nitrosign-benchserver l4relay): it relays every connection accepted on l
// to upstream with io.Copy, one goroutine per direction, until ctx ends,
// then closes l and every relayed connection and returns once all its
// goroutines have. Either side ending closes both. busy > 0 makes it a
// calibration: each read costs that much CPU before it is written on
// (copyBusy).
func L4Relay(ctx context.Context, l net.Listener, upstream string, busy time.Duration) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	defer l.Close()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	d := net.Dialer{Timeout: 5 * time.Second}
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Go(func() {
			up, err := d.DialContext(ctx, "tcp", upstream)
			if err != nil {
				c.Close()
				return
			}
			done := make(chan struct{}, 2)
			pipe := func(dst, src net.Conn) {
				if busy > 0 {
					copyBusy(dst, src, busy)
				} else {
					_, _ = io.Copy(dst, src)
				}
				done <- struct{}{}
			}
			go pipe(up, c)
			go pipe(c, up)
			n := 0
			select { // either side ended, or we are stopping
			case <-done:
				n = 1
			case <-ctx.Done():
			}
			c.Close()
			up.Close()
			for ; n < 2; n++ {
				<-done
			}
		})
	}
}

// copyBusy copies src to dst until either fails, spending busy of CPU on
// every read before writing it.
func copyBusy(dst, src net.Conn, busy time.Duration) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			for start := time.Now(); time.Since(start) < busy; {
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
