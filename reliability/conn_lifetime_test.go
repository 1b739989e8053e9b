package reliability_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/limits"
)

// Connection lifetime limits: an idle client connection is sent GOAWAY
// (max_idle) and closed; an old one is sent GOAWAY (max_age) and, after the
// grace period, closed even with a call still open. The proxy has both by
// default (15m, 1h + 30s); the enclave has neither by default (the proxy's
// pool keeps its connections on purpose) but can be given them.
func TestConnectionIdleAndAge(t *testing.T) {
	log := testLogger(t, nil)
	const idle, age, grace = 500 * time.Millisecond, time.Second, 500 * time.Millisecond
	e := startEnclave(t, enclaveConfig(func(c *limits.Config) {
		c.MaxConnectionIdle, c.MaxConnectionAge, c.MaxConnectionAgeGrace = idle, age, grace
	}), 0, log)
	up := startEnclave(t, enclaveConfig(nil), 0, log)
	p := startProxy(t, proxyConfig(up.target(), func(c *proxy.Config) {
		c.Limits.MaxConnectionIdle, c.Limits.MaxConnectionAge, c.Limits.MaxConnectionAgeGrace = idle, age, grace
	}), 0, log)
	p.waitReady(t, 2)
	for _, tg := range []struct{ name, addr string }{{"enclave", e.addr}, {"proxy", p.addr}} {
		t.Run(tg.name+"/idle", func(t *testing.T) {
			h := newH2(t, tg.addr, h2opts{})
			ga := h.waitClosed(10 * time.Second)
			if ga == nil || ga.code != http2.ErrCodeNo || ga.debug != "max_idle" {
				t.Fatalf("GOAWAY %+v, want NO_ERROR max_idle", ga)
			}
		})
		t.Run(tg.name+"/age", func(t *testing.T) {
			h := newH2(t, tg.addr, h2opts{})
			// A call that never sends its request keeps the connection
			// busy (not idle) until the age and its grace cut it.
			h.open(grpcHeaders(echoPath), nil, false)
			ga := h.waitClosed(10 * time.Second)
			if ga == nil || ga.debug != "max_age" {
				t.Fatalf("GOAWAY %+v, want max_age", ga)
			}
		})
	}
	goodCall(t, &catTarget{name: "proxy", addr: p.addr, cc: dial(t, p.addr)})
}
