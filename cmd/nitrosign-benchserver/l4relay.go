package main

import (
	"context"
	"errors"
	"io"
	"net"
	"time"

	"github.com/nitrosign/nitrosign/host/bench"
)

const l4relayUsage = `Usage: nitrosign-benchserver l4relay [flags]

A plain layer-4 TCP relay, the baseline any proxy is measured against: it
accepts a connection, dials the upstream, copies bytes both ways with
io.Copy (one goroutine per direction), and closes both sockets as soon as
either side ends. TCP_NODELAY is on for both sockets (Go's default), so
nothing is held back for Nagle. It knows nothing of HTTP/2 or gRPC. Runs
until SIGINT or SIGTERM, then closes every connection. Loopback only.

With --busy D it is a calibration instead: each direction reads into a
buffer, spends D of CPU in a busy loop, then writes what it read. Beside
the plain relay in one compare it shows what a given amount of work per
call (2 x D at one call in flight: request and response) adds to the
latency on this machine, where it is more than the work itself.

Examples:
  nitrosign-benchserver l4relay --listen 127.0.0.1:17004 --upstream 127.0.0.1:17001
  nitrosign compare --target direct=tcp://127.0.0.1:17001 --target l4relay=tcp://127.0.0.1:17004 --concurrency 1
  nitrosign-benchserver l4relay --listen 127.0.0.1:17005 --upstream 127.0.0.1:17001 --busy 12us
`

func runL4Relay(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("l4relay", l4relayUsage, stderr)
	listen := fs.String("listen", "127.0.0.1:7004", "loopback `HOST:PORT` to accept on")
	upstream := fs.String("upstream", "127.0.0.1:7001", "loopback `HOST:PORT` to relay to")
	busy := fs.Duration("busy", 0, "calibration: CPU spent in a busy loop on every read before it is written on (0: plain io.Copy); at most 10ms")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *busy < 0 || *busy > 10*time.Millisecond {
		return usageErr(stderr, fs.Name(), "--busy %v: must be between 0 and 10ms", *busy)
	}
	if err := errors.Join(loopbackListen(*listen), loopbackListen(*upstream)); err != nil {
		return usageErr(stderr, fs.Name(), "%s", err)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	return bench.L4Relay(ctx, l, *upstream, *busy)
}
