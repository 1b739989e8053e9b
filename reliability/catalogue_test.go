package reliability_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/limits"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// catTarget is one server under the catalogue: the enclave directly, or
// the proxy in front of an enclave. Its limits are the defaults except
// where a case would otherwise wait minutes (handshake, keepalive) or need
// thousands of held streams (streams per connection).
type catTarget struct {
	name string
	addr string
	cc   *grpc.ClientConn // a long-lived good client

	metadataLimit   int // soft: ResourceExhausted
	headerListLimit int // hard: the transport
	maxStreams      int
	handshake       time.Duration
	keepalive       time.Duration // ping after silence + wait for the ack
}

// Test settings shared by both targets.
const (
	catHandshake  = time.Second
	catKeepalive  = time.Second // both KeepaliveTime and KeepaliveTimeout
	catMaxStreams = 100
)

func catalogueTargets(t *testing.T) []*catTarget {
	t.Helper()
	log := testLogger(t, nil)
	encCfg := enclaveConfig(func(c *limits.Config) {
		c.HandshakeTimeout = catHandshake
		c.KeepaliveTime, c.KeepaliveTimeout = catKeepalive, catKeepalive
		c.MaxConcurrentStreams = catMaxStreams
	})
	e := startEnclave(t, encCfg, 0, log)
	// The proxy's enclave keeps its default limits: what the proxy
	// forwards must pass them.
	up := startEnclave(t, enclaveConfig(nil), 0, log)
	p := startProxy(t, proxyConfig(up.target(), func(c *proxy.Config) {
		c.Limits.HandshakeTimeout = catHandshake
		c.Limits.KeepaliveTime, c.Limits.KeepaliveTimeout = catKeepalive, catKeepalive
		c.Limits.MaxConcurrentStreams = catMaxStreams
	}), 0, log)
	p.waitReady(t, 2)
	dp := proxy.DefaultConfig()
	return []*catTarget{
		{name: "enclave", addr: e.addr, cc: dial(t, e.addr),
			metadataLimit: server.DefaultMaxMetadataSize, headerListLimit: server.DefaultMaxHeaderListSize,
			maxStreams: catMaxStreams, handshake: catHandshake, keepalive: 2 * catKeepalive},
		{name: "proxy", addr: p.addr, cc: dial(t, p.addr),
			metadataLimit: dp.Limits.MaxMetadataSize, headerListLimit: int(dp.Limits.MaxHeaderListSize),
			maxStreams: catMaxStreams, handshake: catHandshake, keepalive: 2 * catKeepalive},
	}
}

// catCase is one entry of the catalogue. run drives the bad input against
// tg and checks the answer itself; it returns the outcome as the docs
// state it.
type catCase struct {
	name string
	run  func(t *testing.T, tg *catTarget) string
}

var (
	eccSel = &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	rsaSel = &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_RSA}}
	edSel  = &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ED25519}}
)

// wantCode checks err's code and returns "CODE: message".
func wantCode(t *testing.T, err error, want codes.Code) string {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
	if want != codes.OK && st.Message() == "" {
		t.Fatalf("%s without a message", want)
	}
	if want == codes.OK {
		return "OK"
	}
	return fmt.Sprintf("%s: %s", st.Code(), st.Message())
}

// signCase is a Sign request that must fail with want.
func signCase(name string, req *pb.SignRequest, want codes.Code) catCase {
	return catCase{name, func(t *testing.T, tg *catTarget) string {
		_, err := pb.NewSignerServiceClient(tg.cc).Sign(callCtx(t), req)
		return wantCode(t, err, want)
	}}
}

// rawBytes goes on the wire as it is (rawCodec).
type rawBytes []byte

type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.(rawBytes))}, nil
}
func (rawCodec) Unmarshal(mem.BufferSlice, any) error { return nil }
func (rawCodec) Name() string                         { return "proto" }

// rawSignCase sends body as a Sign request's bytes.
func rawSignCase(name string, body []byte, want codes.Code) catCase {
	return catCase{name, func(t *testing.T, tg *catTarget) string {
		err := tg.cc.Invoke(callCtx(t), "/nitrosign.v1.SignerService/Sign", rawBytes(body), &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
		return wantCode(t, err, want)
	}}
}

const echoPath = "/nitrosign.v1.EchoService/Echo"

// h2Case sends one raw call (headers as given, body as is) and checks
// the answer with check.
func h2Case(name string, fields func(tg *catTarget) []hpack.HeaderField, body []byte, check func(t *testing.T, s h2stream) string) catCase {
	return catCase{name, func(t *testing.T, tg *catTarget) string {
		h := newH2(t, tg.addr, h2opts{})
		id := h.open(fields(tg), body, true)
		return check(t, h.wait(id, 10*time.Second))
	}}
}

func grpcStatusIs(want codes.Code, msgPart string) func(t *testing.T, s h2stream) string {
	return func(t *testing.T, s h2stream) string {
		t.Helper()
		// A server that answers before the request ended resets the
		// stream with NO_ERROR after its status: that is the answer too.
		if (s.rst && s.rstCode != http2.ErrCodeNo) || s.grpcStatus != int(want) || !strings.Contains(s.grpcMessage, msgPart) {
			t.Fatalf("got %+v, want grpc-status %d (%s) with %q", s, want, want, msgPart)
		}
		out := want.String()
		if s.grpcMessage != "" {
			out += ": " + s.grpcMessage
		}
		if s.httpStatus != "200" {
			out = fmt.Sprintf("HTTP %s, %s", s.httpStatus, out)
		}
		return out
	}
}

func rstIs(want http2.ErrCode) func(t *testing.T, s h2stream) string {
	return func(t *testing.T, s h2stream) string {
		t.Helper()
		if !s.rst || s.rstCode != want {
			t.Fatalf("got %+v, want RST_STREAM %s", s, want)
		}
		return "RST_STREAM " + want.String()
	}
}

func echoFields(extra ...hpack.HeaderField) func(*catTarget) []hpack.HeaderField {
	return func(*catTarget) []hpack.HeaderField { return grpcHeaders(echoPath, extra...) }
}

// wireCase writes data on a fresh connection and expects the server to
// close it within within (after at most a GOAWAY or an HTTP answer).
func wireCase(name string, data func(c net.Conn) error, within func(tg *catTarget) time.Duration) catCase {
	return catCase{name, func(t *testing.T, tg *catTarget) string {
		c, err := net.DialTimeout("tcp", tg.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		limit := within(tg)
		start := time.Now()
		if err := data(c); err != nil && !isClosedErr(err) {
			t.Fatalf("write: %v", err)
		}
		_ = c.SetReadDeadline(start.Add(limit + 10*time.Second))
		got, err := io.ReadAll(c)
		if err != nil && !isClosedErr(err) {
			t.Fatalf("connection not closed within %s: %v", limit+10*time.Second, err)
		}
		out := "connection closed"
		if len(got) > 0 {
			out += fmt.Sprintf(" after %d bytes (%s)", len(got), describeAnswer(got))
		}
		return out
	}}
}

// describeAnswer names what a server wrote before closing.
func describeAnswer(b []byte) string {
	if bytes.HasPrefix(b, []byte("HTTP/1.")) {
		line, _, _ := bytes.Cut(b, []byte("\r\n"))
		return string(line)
	}
	fr := http2.NewFramer(io.Discard, bytes.NewReader(b))
	var kinds []string
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			kinds = append(kinds, fmt.Sprintf("GOAWAY %s %q", g.ErrCode, g.DebugData()))
			continue
		}
		kinds = append(kinds, f.Header().Type.String())
	}
	return strings.Join(kinds, ", ")
}

func isClosedErr(err error) bool {
	if err == nil {
		return true
	}
	s := err.Error()
	return err == io.EOF || strings.Contains(s, "connection reset") || strings.Contains(s, "broken pipe") || strings.Contains(s, "use of closed")
}

func write(b []byte) func(net.Conn) error {
	return func(c net.Conn) error { _, err := c.Write(b); return err }
}

func immediately(*catTarget) time.Duration       { return 0 }
func handshakeLimit(tg *catTarget) time.Duration { return tg.handshake }

func catalogue() []catCase {
	digest := sha256.Sum256([]byte("m"))
	signBody, _ := proto.Marshal(&pb.SignRequest{Key: eccSel, Message: []byte("m")})
	return []catCase{
		// The API: every caller mistake gets its precise status.
		signCase("Sign: empty request", &pb.SignRequest{}, codes.InvalidArgument),
		signCase("Sign: KEY_TYPE_UNSPECIFIED", &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{}}, Message: []byte("m")}, codes.InvalidArgument),
		signCase("Sign: unknown key type 99", &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: 99}}, Message: []byte("m")}, codes.InvalidArgument),
		signCase("Sign: unknown signing algorithm 4242", &pb.SignRequest{Key: eccSel, Message: []byte("m"), SigningAlgorithm: 4242}, codes.InvalidArgument),
		signCase("Sign: unknown message type 7", &pb.SignRequest{Key: eccSel, Message: []byte("m"), MessageType: 7}, codes.InvalidArgument),
		signCase("Sign: algorithm of another key type (RSASSA_PSS on ECC)", &pb.SignRequest{Key: eccSel, Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256}, codes.InvalidArgument),
		signCase("Sign: empty RAW message", &pb.SignRequest{Key: rsaSel}, codes.InvalidArgument),
		signCase("Sign: RAW message of 4097 bytes", &pb.SignRequest{Key: eccSel, Message: make([]byte, 4097)}, codes.InvalidArgument),
		signCase("Sign: DIGEST of 31 bytes for SHA-256", &pb.SignRequest{Key: eccSel, Message: digest[:31], MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, codes.InvalidArgument),
		signCase("Sign: DIGEST of 33 bytes for SHA-256", &pb.SignRequest{Key: eccSel, Message: append(digest[:], 0), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, codes.InvalidArgument),
		signCase("Sign: DIGEST with ED25519_SHA_512", &pb.SignRequest{Key: edSel, Message: make([]byte, 64), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, codes.InvalidArgument),
		signCase("Sign: key id of 63 characters", &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: strings.Repeat("a", 63)}}, Message: []byte("m")}, codes.InvalidArgument),
		signCase("Sign: key id in upper-case hex", &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: strings.Repeat("A", 64)}}, Message: []byte("m")}, codes.InvalidArgument),
		signCase("Sign: unknown key id", &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: strings.Repeat("0", 64)}}, Message: []byte("m")}, codes.NotFound),
		{"GetPublicKey: no key selector", func(t *testing.T, tg *catTarget) string {
			_, err := pb.NewSignerServiceClient(tg.cc).GetPublicKey(callCtx(t), &pb.GetPublicKeyRequest{})
			return wantCode(t, err, codes.InvalidArgument)
		}},
		{"Attest: nonce of 1025 bytes", func(t *testing.T, tg *catTarget) string {
			_, err := pb.NewAttestationServiceClient(tg.cc).Attest(callCtx(t), &pb.AttestRequest{Nonce: make([]byte, 1025)})
			return wantCode(t, err, codes.InvalidArgument)
		}},
		{"Attest: user_data of 1025 bytes", func(t *testing.T, tg *catTarget) string {
			_, err := pb.NewAttestationServiceClient(tg.cc).Attest(callCtx(t), &pb.AttestRequest{UserData: make([]byte, 1025)})
			return wantCode(t, err, codes.InvalidArgument)
		}},
		{"Echo: 2 MiB request (enclave limit 1 MiB)", func(t *testing.T, tg *catTarget) string {
			_, err := pb.NewEchoServiceClient(tg.cc).Echo(callCtx(t), &pb.EchoRequest{Payload: make([]byte, 2<<20)})
			return wantCode(t, err, codes.ResourceExhausted)
		}},
		{"unknown method", func(t *testing.T, tg *catTarget) string {
			err := tg.cc.Invoke(callCtx(t), "/nitrosign.v1.SignerService/Destroy", rawBytes(nil), &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
			return wantCode(t, err, codes.Unimplemented)
		}},
		{"unknown service", func(t *testing.T, tg *catTarget) string {
			err := tg.cc.Invoke(callCtx(t), "/evil.v1.Backdoor/Open", rawBytes(nil), &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
			return wantCode(t, err, codes.Unimplemented)
		}},

		// Malformed messages.
		rawSignCase("Sign: malformed protobuf (truncated varint)", []byte{0x0a, 0xff}, codes.InvalidArgument),
		rawSignCase("Sign: wrong wire type for a field", []byte{0x0d, 1, 2, 3, 4}, codes.InvalidArgument),
		rawSignCase("Sign: 256 bytes of 0xff", bytes.Repeat([]byte{0xff}, 256), codes.InvalidArgument),
		rawSignCase("Sign: only unknown fields (treated as an empty request)", []byte{0xf8, 0x3e, 0x01}, codes.InvalidArgument),
		rawSignCase("Sign: valid protobuf for another message (an EchoRequest)", mustMarshal(&pb.EchoRequest{Payload: []byte("x")}), codes.InvalidArgument),
		h2Case("gRPC frame declaring a 2 GiB message (5-byte prefix only)", echoFields(), []byte{0, 0x7f, 0xff, 0xff, 0xff},
			grpcStatusIs(codes.ResourceExhausted, "larger than max")),
		h2Case("gRPC frame truncated (declares 100 bytes, sends 10)", echoFields(), append([]byte{0, 0, 0, 0, 100}, make([]byte, 10)...),
			grpcStatusIs(codes.Internal, "")),
		h2Case("compressed message with an unknown grpc-encoding", echoFields(hf("grpc-encoding", "snappy")), []byte{1, 0, 0, 0, 1, 0},
			grpcStatusIs(codes.Unimplemented, "snappy")),
		h2Case("compressed flag without grpc-encoding", echoFields(), []byte{1, 0, 0, 0, 1, 0},
			grpcStatusIs(codes.Internal, "compressed flag set")),

		// Metadata and headers.
		{"metadata over the metadata limit (grpc-go client)", func(t *testing.T, tg *catTarget) string {
			ctx := metadata.AppendToOutgoingContext(callCtx(t), "x-big", strings.Repeat("v", tg.metadataLimit))
			_, err := pb.NewEchoServiceClient(tg.cc).Echo(ctx, &pb.EchoRequest{})
			return wantCode(t, err, codes.ResourceExhausted)
		}},
		{"metadata over the header list limit (grpc-go client refuses to send)", func(t *testing.T, tg *catTarget) string {
			ctx := metadata.AppendToOutgoingContext(callCtx(t), "x-big", strings.Repeat("v", tg.headerListLimit))
			_, err := pb.NewEchoServiceClient(tg.cc).Echo(ctx, &pb.EchoRequest{})
			out := wantCode(t, err, codes.Internal)
			if !strings.Contains(out, "violates the maximum size") {
				t.Fatalf("got %s: want grpc-go's own refusal", out)
			}
			return out + " (raised by the client library; nothing was sent)"
		}},
		{"huge metadata, raw (1 MiB over HEADERS and CONTINUATION frames)", func(t *testing.T, tg *catTarget) string {
			h := newH2(t, tg.addr, h2opts{})
			h.open(grpcHeaders(echoPath, hf("x-huge", strings.Repeat("h", 1<<20))), grpcFrame(nil), true)
			// The GOAWAY is often lost: the server closes while our
			// megabyte is still unread, and the kernel resets.
			if ga := h.waitClosed(10 * time.Second); ga != nil && ga.code != http2.ErrCodeProtocol {
				t.Fatalf("GOAWAY %+v, want PROTOCOL_ERROR", ga)
			}
			return "connection closed (GOAWAY PROTOCOL_ERROR): a header block that outgrows the limit by more than a frame is not decoded (x/net/http2's CONTINUATION-flood guard)"
		}},
		h2Case("HPACK bomb: 1,000 copies of a 100-byte entry (2 KB encoded, 135 KB decoded)", func(*catTarget) []hpack.HeaderField {
			fields := grpcHeaders(echoPath)
			for range 1000 {
				fields = append(fields, hf("x-k", strings.Repeat("v", 100)))
			}
			return fields
		}, grpcFrame(nil), rstIs(http2.ErrCodeFrameSize)),
		h2Case("invalid UTF-8 in a metadata value, raw", echoFields(hf("x-trace", "a\xff\xfeb")), grpcFrame(nil),
			grpcStatusIs(codes.InvalidArgument, "not printable ASCII")),
		h2Case("UTF-8 text (not ASCII) in a metadata value, raw", echoFields(hf("x-name", "caf\u00e9")), grpcFrame(nil),
			grpcStatusIs(codes.InvalidArgument, "not printable ASCII")),
		h2Case("control character in a metadata value, raw", echoFields(hf("x-ctl", "a\x01b")), grpcFrame(nil),
			rstIs(http2.ErrCodeProtocol)),
		h2Case("illegal character in a metadata key, raw", echoFields(hf("x!key", "v")), grpcFrame(nil),
			grpcStatusIs(codes.InvalidArgument, "only 0-9 a-z")),
		h2Case("malformed base64 in a -bin metadata value, raw", echoFields(hf("x-data-bin", "!!!")), grpcFrame(nil),
			grpcStatusIs(codes.Internal, "malformed binary metadata")),
		{"invalid UTF-8 in x-request-id, raw", func(t *testing.T, tg *catTarget) string {
			h := newH2(t, tg.addr, h2opts{})
			s := h.wait(h.call(echoPath, nil, hf("x-request-id", "id\xff")), 10*time.Second)
			if tg.name == "proxy" {
				// The proxy replaces an id that is not well formed with
				// a fresh one (internal/requestid) before any check.
				return grpcStatusIs(codes.OK, "")(t, s) + " (the proxy replaces a malformed x-request-id with a fresh one)"
			}
			return grpcStatusIs(codes.InvalidArgument, "x-request-id")(t, s)
		}},
		h2Case("deadline already expired (grpc-timeout 1n), raw", echoFields(hf("grpc-timeout", "1n")), grpcFrame(nil),
			grpcStatusIs(codes.DeadlineExceeded, "")),
		h2Case("malformed grpc-timeout, raw", echoFields(hf("grpc-timeout", "soon")), grpcFrame(nil),
			grpcStatusIs(codes.Internal, "malformed grpc-timeout")),
		h2Case("content-type application/json, raw", echoFields(hf("content-type", "application/json")), []byte("{}"),
			grpcStatusIs(codes.InvalidArgument, "content-type")),
		h2Case(":method GET, raw", echoFields(hf(":method", "GET")), nil,
			grpcStatusIs(codes.Internal, "")),
		h2Case("no :authority, raw", echoFields(hf(":authority", "")), grpcFrame(nil),
			grpcStatusIs(codes.Internal, "authority")),
		h2Case("valid call with Sign bytes, raw (control)", func(*catTarget) []hpack.HeaderField {
			return grpcHeaders("/nitrosign.v1.SignerService/Sign")
		}, grpcFrame(signBody), grpcStatusIs(codes.OK, "")),

		// The wire: garbage and other protocols.
		wireCase("garbage bytes", write(bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 4096)), immediately),
		wireCase("HTTP/1.1 GET", write([]byte("GET /nitrosign.v1.SignerService/ListKeys HTTP/1.1\r\nHost: x\r\n\r\n")), immediately),
		wireCase("HTTP/1.1 h2c upgrade", write([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")), immediately),
		wireCase("TLS ClientHello on the plaintext port", func(c net.Conn) error {
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			err := tls.Client(c, &tls.Config{ServerName: "nitrosign", MinVersion: tls.VersionTLS12}).Handshake()
			if err == nil {
				return fmt.Errorf("TLS handshake succeeded on a plaintext port")
			}
			_ = c.SetDeadline(time.Time{})
			return nil
		}, immediately),
		wireCase("connect and close", func(c net.Conn) error { return c.Close() }, immediately),
		wireCase("half a preface, then silence (slowloris)", write([]byte("PRI * HTTP/2.0\r\n")), handshakeLimit),
		wireCase("preface without SETTINGS, then silence", write([]byte(http2.ClientPreface)), handshakeLimit),
		wireCase("preface dripped one byte every 100ms (slowloris)", func(c net.Conn) error {
			for _, b := range []byte(http2.ClientPreface) {
				if _, err := c.Write([]byte{b}); err != nil {
					return err
				}
				time.Sleep(100 * time.Millisecond)
			}
			return nil
		}, handshakeLimit),
		wireCase("preface, then a garbage frame", write(append([]byte(http2.ClientPreface), bytes.Repeat([]byte{0xff}, 64)...)), immediately),
		wireCase("frame larger than SETTINGS_MAX_FRAME_SIZE", func(c net.Conn) error {
			fr := http2.NewFramer(c, nil)
			_, _ = c.Write([]byte(http2.ClientPreface))
			_ = fr.WriteSettings()
			return fr.WriteRawFrame(http2.FrameData, 0, 1, make([]byte, 20000))
		}, immediately),
		wireCase("HEADERS on an even (server) stream id", func(c net.Conn) error {
			var buf bytes.Buffer
			enc := hpack.NewEncoder(&buf)
			for _, f := range grpcHeaders(echoPath) {
				_ = enc.WriteField(f)
			}
			fr := http2.NewFramer(c, nil)
			_, _ = c.Write([]byte(http2.ClientPreface))
			_ = fr.WriteSettings()
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: buf.Bytes(), EndHeaders: true})
		}, immediately),
		{"half-open connection (handshake, then never reads or answers pings)", func(t *testing.T, tg *catTarget) string {
			h := newH2(t, tg.addr, h2opts{silent: true})
			start := time.Now()
			_ = h.conn.SetReadDeadline(start.Add(tg.keepalive + 15*time.Second))
			got, err := io.ReadAll(h.conn)
			if err != nil && !isClosedErr(err) {
				t.Fatalf("half-open connection kept open: %v", err)
			}
			return fmt.Sprintf("closed by keepalive after ping timeout (%s)", describeAnswer(got[len(got)-min(len(got), 64):]))
		}},
		{"ping flood (20 PINGs, no calls)", func(t *testing.T, tg *catTarget) string {
			h := newH2(t, tg.addr, h2opts{})
			for range 20 {
				h.ping()
			}
			ga := h.waitClosed(10 * time.Second)
			if ga == nil || ga.code != http2.ErrCodeEnhanceYourCalm || ga.debug != "too_many_pings" {
				t.Fatalf("GOAWAY %+v, want ENHANCE_YOUR_CALM too_many_pings", ga)
			}
			return fmt.Sprintf("GOAWAY %s %q, connection closed", ga.code, ga.debug)
		}},
		{"10,000 streams on one connection", tenThousandStreams},
	}
}

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// tenThousandStreams opens maxStreams calls that wait for their request
// body, then 10,000 - maxStreams more in one burst: every one of those is
// refused (RST_STREAM REFUSED_STREAM) while the connection lives on; then
// the held calls finish and are answered.
func tenThousandStreams(t *testing.T, tg *catTarget) string {
	const total = 10000
	h := newH2(t, tg.addr, h2opts{})
	eventually(t, 5*time.Second, "the server's SETTINGS", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		_, ok := h.settings[http2.SettingMaxConcurrentStreams]
		return ok
	})
	h.mu.Lock()
	advertised := h.settings[http2.SettingMaxConcurrentStreams]
	h.mu.Unlock()
	if int(advertised) != tg.maxStreams {
		t.Fatalf("server advertises %d concurrent streams, want %d", advertised, tg.maxStreams)
	}
	held := make([]uint32, tg.maxStreams)
	for i := range held {
		held[i] = h.open(grpcHeaders(echoPath), nil, false)
	}
	// A PING round trip: the held HEADERS were all read before it.
	if !h.alive(10 * time.Second) {
		t.Fatal("connection died while opening the held streams")
	}
	burst := make([]uint32, total-len(held))
	body := grpcFrame(nil)
	for i := range burst {
		burst[i] = h.open(grpcHeaders(echoPath), body, true)
	}
	eventually(t, 60*time.Second, "every burst stream to be answered", func() bool { return h.counts(burst)["open"] == 0 })
	burstCounts := h.counts(burst)
	if burstCounts["RST REFUSED_STREAM"] != len(burst) {
		t.Fatalf("burst outcomes %v, want all %d REFUSED_STREAM", burstCounts, len(burst))
	}
	if !h.alive(10 * time.Second) {
		t.Fatal("the connection did not survive 10,000 streams")
	}
	for _, id := range held {
		h.finish(id, nil)
	}
	eventually(t, 30*time.Second, "the held streams to be answered", func() bool { return h.counts(held)["open"] == 0 })
	heldCounts := h.counts(held)
	if heldCounts["grpc-status 0"] != len(held) {
		t.Fatalf("held stream outcomes %v, want all %d OK", heldCounts, len(held))
	}
	// And a new call on the same connection is served.
	id := h.call(echoPath, nil)
	if s := h.wait(id, 10*time.Second); s.rst || s.grpcStatus != 0 {
		t.Fatalf("call after the burst: %+v", s)
	}
	return fmt.Sprintf("%d held streams answered OK, %d refused with RST_STREAM REFUSED_STREAM, connection kept",
		len(held), burstCounts["RST REFUSED_STREAM"])
}

// goodCall proves the target still serves: Echo on the long-lived client
// and Sign on a new connection.
func goodCall(t *testing.T, tg *catTarget) {
	t.Helper()
	if _, err := pb.NewEchoServiceClient(tg.cc).Echo(callCtx(t), &pb.EchoRequest{Payload: []byte("still here")}); err != nil {
		t.Fatalf("%s stopped serving its existing connection: %v", tg.name, err)
	}
	cc := dial(t, tg.addr)
	if _, err := pb.NewSignerServiceClient(cc).Sign(callCtx(t), &pb.SignRequest{Key: eccSel, Message: []byte("good")}); err != nil {
		t.Fatalf("%s stopped serving new connections: %v", tg.name, err)
	}
	_ = cc.Close()
}

// TestBadInputCatalogue runs every catalogue case against the enclave and
// against the proxy; after each one, both still serve good calls.
func TestBadInputCatalogue(t *testing.T) {
	targets := catalogueTargets(t)
	cases := catalogue()
	if len(cases) < 30 {
		t.Fatalf("the catalogue has %d cases, want at least 30", len(cases))
	}
	var mu sync.Mutex
	outcomes := map[string]map[string]string{} // case -> target -> outcome
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					out := c.run(t, tg)
					goodCall(t, tg)
					mu.Lock()
					if outcomes[c.name] == nil {
						outcomes[c.name] = map[string]string{}
					}
					outcomes[c.name][tg.name] = out
					mu.Unlock()
				})
			}
		})
	}
	// The table for docs/RELIABILITY.md (go test -v shows it).
	names := make([]string, 0, len(outcomes))
	for n := range outcomes {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, c := range cases {
		o := outcomes[c.name]
		fmt.Fprintf(&b, "| %s | %s | %s |\n", c.name, o["enclave"], o["proxy"])
	}
	t.Logf("%d cases:\n%s", len(cases), b.String())
	if dir := os.Getenv("NITROSIGN_CATALOGUE_OUT"); dir != "" {
		_ = os.WriteFile(dir, []byte(b.String()), 0o644)
	}
}

var _ = context.Background
