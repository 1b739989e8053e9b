package proxy

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// frameReader reads one connection's frames, assembling each header block
// (HEADERS and its CONTINUATION frames) into a MetaHeadersFrame with the
// rules of x/net's Framer.ReadMetaHeaders: field names and values
// checked, pseudo-headers first and valid, the header list bounded by
// SETTINGS_MAX_HEADER_LIST_SIZE (Truncated beyond it), an oversized or
// invalid block a connection error before it is decoded any further.
//
// Unlike the Framer's, it allocates nothing per block: the HPACK
// decoder's emit function, the field slice and the frame are the
// reader's own and are reused, which halves what a relayed call
// allocates. So a header block is valid only until the next ReadFrame;
// whoever keeps its fields copies them.
type frameReader struct {
	fr  *http2.Framer
	dec *hpack.Decoder
	max uint32 // the header list limit

	mh     http2.MetaHeadersFrame
	fields []hpack.HeaderField

	// The block being decoded.
	headersLeft, trailersLeft uint32
	sawRegular                bool
	truncated                 bool
	invalid                   error
}

// newFrameReader reads the frames of rd (at most maxFrameSize each) with
// a header list limit of max (0: x/net's default, 16 MiB).
func newFrameReader(rd io.Reader, max uint32) *frameReader {
	if max == 0 {
		max = 16 << 20
	}
	fr := http2.NewFramer(nil, rd)
	fr.SetMaxReadFrameSize(maxFrameSize)
	r := &frameReader{fr: fr, max: max}
	r.dec = hpack.NewDecoder(4096, r.emit)
	r.dec.SetMaxStringLength(int(min(uint64(max), 1<<31-1)))
	return r
}

// ReadFrame returns the next frame; a header block comes as one
// *http2.MetaHeadersFrame.
func (r *frameReader) ReadFrame() (http2.Frame, error) {
	f, err := r.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	if hf, ok := f.(*http2.HeadersFrame); ok {
		return r.block(hf)
	}
	return f, nil
}

var (
	errPseudoAfterRegular = errors.New("pseudo header field after regular")
	errMixPseudoHeaders   = errors.New("mix of request and response pseudo headers")
)

// block decodes the header block that hf begins, reading its
// CONTINUATION frames (the Framer checks that nothing comes between).
func (r *frameReader) block(hf *http2.HeadersFrame) (http2.Frame, error) {
	r.fields = r.fields[:0]
	r.headersLeft, r.trailersLeft = r.max, r.max
	r.sawRegular, r.truncated, r.invalid = false, false, nil
	r.dec.SetEmitEnabled(true)
	frag := hf.HeaderBlockFragment()
	ended := hf.HeadersEnded()
	for {
		// A fragment far over what is left of the limit, or any after an
		// invalid field (whose size was no longer counted), is not
		// decoded: the connection ends (as x/net's servers answer).
		if int64(len(frag)) > 2*int64(r.headersLeft+r.trailersLeft) || r.invalid != nil {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := r.dec.Write(frag); err != nil {
			return nil, http2.ConnectionError(http2.ErrCodeCompression)
		}
		if ended {
			break
		}
		f, err := r.fr.ReadFrame()
		if err != nil {
			return nil, err
		}
		cf := f.(*http2.ContinuationFrame) // the Framer allows nothing else here
		frag, ended = cf.HeaderBlockFragment(), cf.HeadersEnded()
	}
	if err := r.dec.Close(); err != nil {
		return nil, http2.ConnectionError(http2.ErrCodeCompression)
	}
	r.mh = http2.MetaHeadersFrame{HeadersFrame: hf, Fields: r.fields, Truncated: r.truncated}
	if r.invalid != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: r.invalid}
	}
	if err := checkPseudos(r.mh.PseudoFields()); err != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: err}
	}
	return &r.mh, nil
}

// emit takes one decoded field.
func (r *frameReader) emit(hf hpack.HeaderField) {
	if !httpguts.ValidHeaderFieldValue(hf.Value) {
		// The value stays out of the error: it may be a secret.
		r.invalid = fmt.Errorf("invalid header field value for %q", hf.Name)
	} else if strings.HasPrefix(hf.Name, ":") {
		if r.sawRegular {
			r.invalid = errPseudoAfterRegular
		}
	} else {
		r.sawRegular = true
		if !validFieldName(hf.Name) {
			r.invalid = fmt.Errorf("invalid header field name %q", hf.Name)
		}
	}
	if r.invalid != nil {
		r.dec.SetEmitEnabled(false)
		return
	}
	left, size := &r.headersLeft, hf.Size()
	if hf.Name == "trailer" {
		// Each name it announces counts as a field of its own.
		n := uint32(strings.Count(hf.Value, ",") + 1)
		left, size = &r.trailersLeft, uint32(len(hf.Value))-n+1+n*32
	}
	if size > *left {
		r.dec.SetEmitEnabled(false)
		r.truncated = true
		r.headersLeft, r.trailersLeft = 0, 0
		return
	}
	*left -= size
	r.fields = append(r.fields, hf)
}

// validFieldName reports whether name is a lowercase HTTP token, as
// HTTP/2 requires of field names on the wire.
func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if !fieldNameByte[name[i]] {
			return false
		}
	}
	return true
}

// fieldNameByte: the bytes of a token (RFC 9110 section 5.6.2), without
// uppercase letters.
var fieldNameByte = func() (t [256]bool) {
	for c := 0; c < 128; c++ {
		t[c] = httpguts.IsTokenRune(rune(c)) && (c < 'A' || c > 'Z')
	}
	return t
}()

// checkPseudos: only the pseudo-headers HTTP/2 defines, none twice, not
// a request's and a response's in one block.
func checkPseudos(pf []hpack.HeaderField) error {
	var request, response bool
	for i, hf := range pf {
		switch hf.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			request = true
		case ":status":
			response = true
		default:
			return fmt.Errorf("invalid pseudo-header %q", hf.Name)
		}
		for _, prev := range pf[:i] {
			if prev.Name == hf.Name {
				return fmt.Errorf("duplicate pseudo-header %q", hf.Name)
			}
		}
	}
	if request && response {
		return errMixPseudoHeaders
	}
	return nil
}
