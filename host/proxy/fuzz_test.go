package proxy_test

import (
	"net"
	"strconv"
	"testing"

	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/target"
)

// FuzzConfigAddresses feeds arbitrary --listen and --upstream values to the
// proxy's configuration check: it must never panic, and what it accepts
// must be usable as is: a listen HOST:PORT with a port 0-65535 that is
// loopback (no TLS is configured here), and an upstream that parses and
// round-trips, never vsock CID 0 or VMADDR_CID_ANY or the nitro-cli
// heartbeat port.
//
//	go test -run='^$' -fuzz=FuzzConfigAddresses -fuzztime=30s ./host/proxy/
func FuzzConfigAddresses(f *testing.F) {
	for _, s := range [][2]string{
		{"127.0.0.1:8443", "vsock://16:5005"},
		{"[::1]:0", "tcp://127.0.0.1:5005"},
		{"localhost:1", "vsock://1:5005"},
		{":8443", "vsock://0:5005"},
		{"10.0.0.1:8443", "vsock://4294967295:5005"},
		{"127.0.0.1:65536", "vsock://16:9000"},
		{"127.0.0.1", "unix:///tmp/s"},
		{"127.0.0.1:http", "tcp://[::1]:x"},
		{"", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, listen, upstream string) {
		c := proxy.DefaultConfig()
		c.Listen, c.Upstream = listen, upstream
		if err := c.Validate(); err != nil {
			if err.Error() == "" {
				t.Fatal("an error without a message")
			}
			return
		}
		host, port, err := net.SplitHostPort(listen)
		if err != nil {
			t.Fatalf("accepted listen %q: %v", listen, err)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p > 65535 {
			t.Fatalf("accepted listen %q with port %q", listen, port)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			t.Fatalf("accepted plaintext listen %q beyond loopback", listen)
		}
		tg, err := target.Parse(upstream)
		if err != nil {
			t.Fatalf("accepted upstream %q that does not parse: %v", upstream, err)
		}
		if again, err := target.Parse(tg.String()); err != nil || again != tg {
			t.Fatalf("upstream %q does not round-trip: %+v %v", upstream, again, err)
		}
		if tg.Scheme == target.VSOCK && (tg.CID == 0 || tg.CID == 0xFFFFFFFF || tg.Port == target.ReservedVsockPort) {
			t.Fatalf("accepted upstream %q", upstream)
		}
	})
}
