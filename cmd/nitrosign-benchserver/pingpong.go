package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"time"
)

// runTCPEcho serves a raw TCP echo on loopback: the floor of one process
// hop on this machine, with no gRPC, HTTP/2 or protobuf in it.
func runTCPEcho(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("tcp-echo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:7010", "loopback `HOST:PORT` to echo on")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if err := loopbackListen(*listen); err != nil {
		fmt.Fprintln(stderr, err)
		return errUsage
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

// runTCPPingPong sends 32-byte messages to a tcp-echo one at a time and
// prints the round-trip percentiles: what any extra process on the path
// costs at one call in flight, before any protocol work.
func runTCPPingPong(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("tcp-pingpong", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := fs.String("target", "127.0.0.1:7010", "the tcp-echo `HOST:PORT`")
	count := fs.Int("count", 20000, "round trips to measure (after 1,000 warm-up ones)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *count < 100 {
		fmt.Fprintln(stderr, "tcp-pingpong: --count must be at least 100")
		return errUsage
	}
	if err := loopbackListen(*target); err != nil {
		fmt.Fprintln(stderr, err)
		return errUsage
	}
	c, err := net.DialTimeout("tcp", *target, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	msg, buf := make([]byte, 32), make([]byte, 32)
	rtts := make([]time.Duration, 0, *count)
	for i := -1000; i < *count; i++ {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if i >= 0 {
			rtts = append(rtts, time.Since(start))
		}
	}
	slices.Sort(rtts)
	q := func(p float64) time.Duration { return rtts[int(p*float64(len(rtts)-1))].Round(100 * time.Nanosecond) }
	fmt.Fprintf(stdout, "tcp ping-pong, 32 B, 1 in flight, %d round trips: min %v  p50 %v  p90 %v  p99 %v  max %v\n",
		len(rtts), rtts[0], q(0.5), q(0.9), q(0.99), rtts[len(rtts)-1])
	return nil
}
