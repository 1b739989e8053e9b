package proxy

import (
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/internal/limits"
	"github.com/nitrosign/nitrosign/internal/requestid"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// The rules of gRPC over HTTP/2 that the relay applies: which request
// headers it accepts and how it rewrites them, the statuses it answers
// with, grpc-timeout, and the 5-byte message prefix it follows for the
// size limits.

// statusError is a status the proxy answers a call with.
type statusError struct {
	code codes.Code
	msg  string
	http int // the HTTP status of the answer; 0: 200
	// rst, when not 0, resets the stream instead (a malformed request
	// that HTTP/2 itself refuses).
	rst http2.ErrCode
}

// statusMessage is err's message without "rpc error: code = X desc = ".
func statusMessage(err error) string {
	s := err.Error()
	if i := strings.Index(s, "desc = "); i >= 0 {
		return s[i+len("desc = "):]
	}
	return s
}

// connectionSpecific reports the fields HTTP/2 forbids (RFC 9113 section
// 8.2.2): a request carrying one is malformed, a stream error of type
// PROTOCOL_ERROR (grpc-go and x/net reset such a stream too).
func connectionSpecific(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

// hopField reports the fields that are not relayed: host (its value
// becomes :authority), and grpc-timeout and x-request-id, which the proxy
// rewrites.
func hopField(name string) bool {
	switch name {
	case "host", "grpc-timeout", requestid.Key:
		return true
	}
	return false
}

// requestHeaders checks a request's headers and builds the upstream's.
func (p *Proxy) requestHeaders(c *call, f *http2.MetaHeadersFrame) ([]hpack.HeaderField, time.Duration, *statusError) {
	var (
		out       = make([]hpack.HeaderField, 0, len(f.Fields)+2)
		timeout   time.Duration
		hasTO     bool
		ct        string
		host      string
		size      int
		headerErr *statusError
	)
	authority := f.PseudoValue("authority")
	out = append(out,
		hpack.HeaderField{Name: ":method", Value: "POST"},
		hpack.HeaderField{Name: ":scheme", Value: "http"},
		hpack.HeaderField{Name: ":path", Value: c.method},
		hpack.HeaderField{}, // :authority, below
	)
	for _, hf := range f.RegularFields() {
		if connectionSpecific(hf.Name) {
			return nil, 0, &statusError{rst: http2.ErrCodeProtocol}
		}
		size += len(hf.Name) + len(hf.Value) + 32
		switch hf.Name {
		case "content-type":
			ct = hf.Value
		case "grpc-timeout":
			d, ok := parseTimeout(hf.Value)
			if !ok && headerErr == nil {
				headerErr = &statusError{codes.Internal, fmt.Sprintf("malformed grpc-timeout: %q", hf.Value), 400, 0}
			}
			timeout, hasTO = d, true
			continue
		case requestid.Key:
			if c.reqID == "" && requestid.Valid(hf.Value) {
				c.reqID = hf.Value
			}
			continue
		case "host":
			host = hf.Value
		}
		if hopField(hf.Name) {
			continue
		}
		if strings.HasSuffix(hf.Name, "-bin") {
			if !validBinHeader(hf.Value) && headerErr == nil {
				headerErr = &statusError{codes.Internal, fmt.Sprintf("malformed binary metadata %q in header %q", hf.Value, hf.Name), 400, 0}
			}
		} else if err := limits.ValidateEntry(hf.Name, hf.Value); err != nil && headerErr == nil {
			headerErr = &statusError{codes.InvalidArgument, statusMessage(err), 0, 0}
		}
		out = append(out, hf)
	}
	// The checks and their answers follow grpc-go's server, so a client
	// sees the same status through the proxy as from the enclave.
	if !isGRPCContentType(ct) {
		return nil, 0, &statusError{codes.InvalidArgument, fmt.Sprintf("invalid gRPC request content-type %q", ct), 415, 0}
	}
	if m := f.PseudoValue("method"); m != "POST" {
		return nil, 0, &statusError{codes.Internal, fmt.Sprintf("invalid gRPC request method %q", m), 405, 0}
	}
	if authority == "" {
		authority = host
	}
	if authority == "" {
		return nil, 0, &statusError{codes.Internal, "no host or :authority header present", 400, 0}
	}
	out[3] = hpack.HeaderField{Name: ":authority", Value: authority}
	if headerErr != nil {
		return nil, 0, headerErr
	}
	if !strings.HasPrefix(c.method, "/") {
		return nil, 0, &statusError{codes.Unimplemented, fmt.Sprintf("malformed method name: %q", c.method), 0, 0}
	}
	if !p.cfg.AllowKeyAdmin && strings.HasPrefix(c.method, keyAdminPrefix) {
		return nil, 0, &statusError{codes.PermissionDenied, "key administration is not served through this proxy (nitrosign-proxy --allow-key-admin): " +
			"rotate from the parent, over vsock to the enclave: nitrosign keys create --target vsock://CID:5005", 0, 0}
	}
	if size > p.cfg.Limits.MaxMetadataSize {
		return nil, 0, &statusError{codes.ResourceExhausted, fmt.Sprintf(
			"request metadata is %d bytes (names + values + 32 per entry), limit %d", size, p.cfg.Limits.MaxMetadataSize), 0, 0}
	}
	if c.reqID == "" {
		c.reqID = requestid.New()
	}
	// Values that change with every call are never indexed (Sensitive):
	// in the connection's HPACK table they would only push out the
	// entries that repeat.
	out = append(out, hpack.HeaderField{Name: requestid.Key, Value: c.reqID, Sensitive: true})
	switch {
	case hasTO:
	case p.unary[c.method]:
		timeout, hasTO = p.cfg.Limits.DefaultCallTimeout, true
	case p.cfg.DefaultStreamTimeout > 0:
		// Streams and methods the proxy does not know: no client holds
		// a stream, and its share of the enclave, for ever by default.
		timeout, hasTO = p.cfg.DefaultStreamTimeout, true
	}
	if hasTO && timeout <= 0 {
		timeout = 1 // already expired: answered DeadlineExceeded at once
	}
	// grpc-timeout is added when the call goes upstream, with what is
	// left of the deadline then.
	return out, timeout, nil
}

// keyAdminPrefix is the path prefix of KeyAdminService's methods.
var keyAdminPrefix = "/" + pb.KeyAdminService_ServiceDesc.ServiceName + "/"

// headerListSize is the size of fields as HTTP/2 counts it against
// SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 section 6.5.2).
func headerListSize(fields []hpack.HeaderField) uint32 {
	var n uint32
	for _, f := range fields {
		n += uint32(len(f.Name) + len(f.Value) + 32)
	}
	return n
}

// isGRPCContentType reports whether ct is application/grpc or one of its
// subtypes (application/grpc+proto, application/grpc;...).
func isGRPCContentType(ct string) bool {
	if !strings.HasPrefix(ct, "application/grpc") {
		return false
	}
	rest := ct[len("application/grpc"):]
	return rest == "" || rest[0] == '+' || rest[0] == ';'
}

// validBinHeader reports whether v is base64, padded or not, as gRPC
// carries -bin metadata values.
func validBinHeader(v string) bool {
	enc := base64.RawStdEncoding
	if len(v)%4 == 0 {
		enc = base64.StdEncoding
	}
	var scratch [256]byte
	for len(v) > 0 {
		// Decode in chunks of whole quanta so no value is too large.
		n := min(len(v), 340)
		if n < len(v) {
			n -= n % 4
		}
		if _, err := enc.Decode(scratch[:], []byte(v[:n])); err != nil {
			return false
		}
		v = v[n:]
		if len(v) > 0 && len(v)%4 == 0 {
			enc = base64.StdEncoding
		}
	}
	return true
}

// httpStatusCode maps a non-200 HTTP status to a gRPC code (gRPC's
// http-grpc-status-mapping).
func httpStatusCode(s string) codes.Code {
	switch s {
	case "400":
		return codes.Internal
	case "401":
		return codes.Unauthenticated
	case "403":
		return codes.PermissionDenied
	case "404":
		return codes.Unimplemented
	case "429", "502", "503", "504":
		return codes.Unavailable
	default:
		return codes.Unknown
	}
}

// msgLimit follows the gRPC length-prefixed messages of one direction and
// refuses a message larger than the limit before it is relayed.
type msgLimit struct {
	hdr  [5]byte
	have int    // header bytes seen of the current message
	left uint32 // body bytes left of the current message
}

func (m *msgLimit) check(data []byte, limit int) error {
	for len(data) > 0 {
		if m.left > 0 {
			n := min(uint32(len(data)), m.left)
			m.left -= n
			data = data[n:]
			continue
		}
		n := copy(m.hdr[m.have:], data)
		m.have += n
		data = data[n:]
		if m.have < 5 {
			return nil
		}
		m.have = 0
		size := uint32(m.hdr[1])<<24 | uint32(m.hdr[2])<<16 | uint32(m.hdr[3])<<8 | uint32(m.hdr[4])
		if int64(size) > int64(limit) {
			return fmt.Errorf("grpc: received message larger than max (%d vs. %d)", size, limit)
		}
		m.left = size
	}
	return nil
}

// statusFields are the fields that end a call with code and msg: the whole
// response (trailers-only, with :status and content-type) when no headers
// were sent, else trailers.
func statusFields(code codes.Code, msg string, headersSent bool) []hpack.HeaderField {
	f := make([]hpack.HeaderField, 0, 4)
	if !headersSent {
		f = append(f, hpack.HeaderField{Name: ":status", Value: "200"},
			hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
	}
	f = append(f, hpack.HeaderField{Name: "grpc-status", Value: strconv.Itoa(int(code))})
	if msg != "" {
		f = append(f, hpack.HeaderField{Name: "grpc-message", Value: encodeGrpcMessage(msg)})
	}
	return f
}

// encodeGrpcMessage percent-encodes msg as the gRPC spec asks for
// grpc-message: bytes outside printable ASCII, and '%'.
func encodeGrpcMessage(msg string) string {
	ok := true
	for i := 0; i < len(msg); i++ {
		if c := msg[i]; c < ' ' || c > '~' || c == '%' {
			ok = false
			break
		}
	}
	if ok {
		return msg
	}
	var b []byte
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if c < ' ' || c > '~' || c == '%' {
			b = fmt.Appendf(b, "%%%02X", c)
		} else {
			b = append(b, c)
		}
	}
	return string(b)
}

// parseTimeout parses a grpc-timeout value ("100m", "30S").
func parseTimeout(s string) (time.Duration, bool) {
	if len(s) < 2 || len(s) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	var unit time.Duration
	switch s[len(s)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	if n > int64(1<<63-1)/int64(unit) {
		return 1<<63 - 1, true
	}
	return time.Duration(n) * unit, true
}

// formatTimeout writes d as a grpc-timeout value (at most 8 digits),
// rounded up so that it is never shorter than d.
func formatTimeout(d time.Duration) string {
	if d <= 0 {
		return "0n"
	}
	for _, u := range []struct {
		d time.Duration
		s string
	}{{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}, {time.Hour, "H"}} {
		v := d / u.d
		if d%u.d != 0 {
			v++
		}
		if v < 1e8 {
			return strconv.FormatInt(int64(v), 10) + u.s
		}
	}
	return "99999999H"
}

// codeFromRST is the status of a call its peer reset, as grpc-go maps it.
func codeFromRST(c http2.ErrCode) codes.Code {
	switch c {
	case http2.ErrCodeRefusedStream:
		return codes.Unavailable
	case http2.ErrCodeCancel:
		return codes.Canceled
	case http2.ErrCodeEnhanceYourCalm:
		return codes.ResourceExhausted
	case http2.ErrCodeInadequateSecurity:
		return codes.PermissionDenied
	default:
		return codes.Internal
	}
}
