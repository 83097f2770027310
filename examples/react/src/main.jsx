import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';

import App from './App.jsx';
import { CentrifugeProvider } from './herald.jsx';
import './style.css';

// Where Herald is: VITE_HERALD_URL at build time (`VITE_HERALD_URL=http://… npm run build`), else the default.
const HERALD_URL = import.meta.env.VITE_HERALD_URL ?? 'http://127.0.0.1:8080';

createRoot(document.getElementById('root')).render(
  <StrictMode>
    {/* One WebSocket for the app. Anonymous here (herald.toml allows it); with tokens, options={{ token, getToken }}. */}
    <CentrifugeProvider url={HERALD_URL.replace(/^http/, 'ws') + '/connection/websocket'}>
      <App hub={HERALD_URL} />
    </CentrifugeProvider>
  </StrictMode>,
);
