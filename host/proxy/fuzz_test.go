package proxy_test

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/target"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
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
		c.Listen, c.Upstreams = listen, []string{upstream}
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

// FuzzRelayFrames writes arbitrary bytes, after the HTTP/2 preface and a
// SETTINGS frame, on a client connection of a running proxy (in front of a
// test upstream): whatever comes, the proxy must not panic (its recovery
// would log it), must end the connection or answer, and must then still
// serve a well-formed call.
//
//	go test -run='^$' -fuzz=FuzzRelayFrames -fuzztime=30s ./host/proxy/
func FuzzRelayFrames(f *testing.F) {
	frame := func(typ http2.FrameType, flags http2.Flags, id uint32, payload []byte) []byte {
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		_ = fr.WriteRawFrame(typ, flags, id, payload)
		return b.Bytes()
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, hf := range []hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: "/nitrosign.v1.EchoService/Echo"}, {Name: ":authority", Value: "x"},
		{Name: "content-type", Value: "application/grpc"}, {Name: "grpc-timeout", Value: "1S"},
	} {
		_ = enc.WriteField(hf)
	}
	headers := frame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1, hb.Bytes())
	body := frame(http2.FrameData, http2.FlagDataEndStream, 1, []byte{0, 0, 0, 0, 2, 0x0a, 0})
	f.Add(append(append([]byte{}, headers...), body...))
	f.Add(headers)
	f.Add(append(append([]byte{}, headers...), frame(http2.FrameRSTStream, 0, 1, []byte{0, 0, 0, 8})...))
	f.Add(append(append([]byte{}, headers...), frame(http2.FrameWindowUpdate, 0, 1, []byte{0x7f, 0xff, 0xff, 0xff})...))
	f.Add(frame(http2.FrameData, 0, 3, []byte("x")))
	f.Add(frame(http2.FramePing, 0, 0, make([]byte, 8)))
	f.Add(frame(http2.FrameContinuation, 0, 1, hb.Bytes()))
	f.Add(frame(http2.FrameGoAway, 0, 0, make([]byte, 8)))
	f.Add([]byte{0xff, 0xff, 0xff})

	core, logs := observer.New(zap.ErrorLevel)
	h := newHarness(f, harnessOpts{poolSize: 1, log: zap.New(core)})
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		var out bytes.Buffer
		out.WriteString(http2.ClientPreface)
		_ = http2.NewFramer(&out, nil).WriteSettings()
		out.Write(data)
		// A PING after the input: its ACK says the proxy has read and
		// handled everything before it (unless the input left a frame
		// unfinished, which the PING then completes or corrupts).
		ping := [8]byte{'f', 'u', 'z', 'z'}
		_ = http2.NewFramer(&out, nil).WritePing(false, ping)
		if _, err := c.Write(out.Bytes()); err != nil {
			return // closed already: an answer too
		}
		// EOF after the input: a frame it left unfinished ends the
		// connection instead of waiting for more.
		_ = c.(*net.TCPConn).CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		fr := http2.NewFramer(nil, c)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				break // closed, or the proxy waits for the rest of a frame
			}
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == ping {
				break
			}
		}
		if n := logs.FilterMessageSnippet("panic").Len(); n > 0 {
			t.Fatalf("the proxy panicked on %x: %v", data, logs.FilterMessageSnippet("panic").All()[0].Context)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("ok")}); err != nil {
			t.Fatalf("after %x the proxy no longer serves: %v", data, err)
		}
	})
}
